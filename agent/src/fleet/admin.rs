//! The administrator's side of the fleet, for the CLI (and the tests and benches): set up
//! the streams, sign and publish commands (keeping those still in force in the snapshot),
//! hear each host's outcome, and read the fleet-wide view and audit.

use std::{collections::BTreeMap, time::Duration};

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage as Publish};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::{
    FleetError,
    command::{Action, Envelope, Target},
    config::FleetConfig,
    keys::AdminKey,
    link::{self, Names},
    nats,
    view::{FleetSession, HostView},
};
use crate::sessions::model::now_ms;

/// A host is shown as connected while its view is at most this old.
pub const CONNECTED_WITHIN_MS: u64 = 5_000;

/// One host's answer to a command, from its `fleet_command_applied` or
/// `fleet_command_refused` audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostOutcome {
    pub host: String,
    pub applied: bool,
    pub outcome: String,
}

/// What `fleet … terminate|lock|policy` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub command: String,
    pub stream_seq: u64,
    /// Hosts that answered within the wait, by name.
    pub outcomes: Vec<HostOutcome>,
    /// Hosts in the view that did not answer within the wait (they will on catching up).
    pub waiting_for: Vec<String>,
}

/// A connection to the fleet as an administrator.
pub struct Admin {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
}

impl Admin {
    /// Connects (the first server that answers) and makes sure the streams and buckets exist.
    ///
    /// # Errors
    /// No server reachable, credentials unreadable, JetStream refused.
    pub async fn connect(config: &FleetConfig, replicas: usize) -> Result<Self, FleetError> {
        let fleet = Self::connect_only(config).await?;
        link::ensure(&fleet.js, &fleet.names, replicas).await?;
        Ok(fleet)
    }

    /// Connects without looking up or creating anything: for a publisher (a relay of
    /// identity signals) whose NATS user may publish on its own subject and nothing else.
    ///
    /// # Errors
    /// No server reachable, credentials unreadable.
    pub async fn connect_only(config: &FleetConfig) -> Result<Self, FleetError> {
        let client = link::connect(config, "flowwarden-admin".into(), true, |_| {}).await?;
        let js = jetstream::new(client.clone());
        let names = Names::new(&config.subject_prefix);
        Ok(Self { client, js, names })
    }

    /// Signs and publishes `action` for `target`; commands that stay in force (`lasting`)
    /// also go into the snapshot bucket, so that an agent whose position was purged still
    /// gets them. Waits up to `wait` for the outcome of every host in the view.
    ///
    /// # Errors
    /// The server does not store the command.
    pub async fn issue(
        &self,
        key: &AdminKey,
        target: Target,
        action: Action,
        lasting: Option<String>,
        wait: Duration,
    ) -> Result<Issued, FleetError> {
        let envelope =
            Envelope::new(key, target.clone(), action).map_err(|_| FleetError::KeyGeneration)?;
        let signed = envelope.sign(key);
        // `{id}` in the snapshot key stands for the command id.
        let lasting = lasting.map(|k| k.replace("{id}", &envelope.id));
        self.publish_signed(&envelope.id, &target, signed, lasting, wait)
            .await
    }

    /// Publishes bytes as a command with `id` (also used by tests to publish forged ones).
    ///
    /// # Errors
    /// The server does not store the command.
    pub async fn publish_signed(
        &self,
        id: &str,
        target: &Target,
        signed: Vec<u8>,
        lasting: Option<String>,
        wait: Duration,
    ) -> Result<Issued, FleetError> {
        let expected: Vec<String> = match target {
            Target::All => self.hosts().await?.into_iter().map(|h| h.host).collect(),
            Target::Host(h) => vec![h.clone()],
        };
        // Listening before publishing, so that no answer is missed.
        let mut answers = if wait.is_zero() {
            None
        } else {
            let mut subs = Vec::new();
            for kind in ["fleet_command_applied", "fleet_command_refused"] {
                subs.push(
                    self.client
                        .subscribe(self.names.events_of_kind(kind))
                        .await
                        .map_err(|e| nats("listen for the hosts' outcomes")(e.to_string()))?,
                );
            }
            Some(futures_util::stream::select_all(subs))
        };
        if let Some(snapshot_key) = &lasting {
            let kv = self
                .js
                .get_key_value(self.names.snapshot_bucket())
                .await
                .map_err(|e| nats("open the snapshot bucket")(e.to_string()))?;
            kv.put(snapshot_key, signed.clone().into())
                .await
                .map_err(|e| nats("record the command in the snapshot")(e.to_string()))?;
        }
        let subject = match target {
            Target::All => self.names.control_all(),
            Target::Host(h) => self.names.control_host(h),
        };
        let ack = self
            .js
            .send_publish(
                subject,
                Publish::build().payload(signed.into()).message_id(id),
            )
            .await
            .map_err(|e| nats("publish the command")(e.to_string()))?
            .await
            .map_err(|e| nats("have the command stored")(e.to_string()))?;
        let mut outcomes = BTreeMap::new();
        if let Some(answers) = &mut answers {
            let deadline = tokio::time::Instant::now() + wait;
            while outcomes.len() < expected.len() {
                let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await else {
                    break;
                };
                if let Some(o) = outcome_of(&msg.payload, id) {
                    outcomes.insert(o.host.clone(), o);
                }
            }
        }
        let waiting_for = expected
            .into_iter()
            .filter(|h| !outcomes.contains_key(h))
            .collect();
        Ok(Issued {
            command: id.to_owned(),
            stream_seq: ack.sequence,
            outcomes: outcomes.into_values().collect(),
            waiting_for,
        })
    }

    /// Publishes a SET (a compact JWS, as its transmitter signed it) to the fleet's signals
    /// stream, as `from` (a relay's name): every agent that trusts its transmitter applies
    /// it. Answers the stream sequence it was stored at.
    ///
    /// # Errors
    /// The server does not store it.
    pub async fn publish_set(&self, from: &str, set: Vec<u8>) -> Result<u64, FleetError> {
        let mut message = Publish::build().payload(set.clone().into());
        // A SET claims its own identity: a retried publication is stored once. (Unverified
        // here; every agent checks the signature.)
        if let Some((iss, jti)) = std::str::from_utf8(&set)
            .ok()
            .and_then(crate::signals::set::claimed_id)
        {
            message = message.message_id(super::signals::set_id(&iss, &jti));
        }
        let ack = self
            .js
            .send_publish(self.names.signals(from), message)
            .await
            .map_err(|e| nats("publish the SET")(e.to_string()))?
            .await
            .map_err(|e| nats("have the SET stored")(e.to_string()))?;
        Ok(ack.sequence)
    }

    /// Removes a lasting command from the snapshot (a lock removed, say).
    ///
    /// # Errors
    /// The bucket cannot be written.
    pub async fn forget(&self, snapshot_key: &str) -> Result<(), FleetError> {
        let kv = self
            .js
            .get_key_value(self.names.snapshot_bucket())
            .await
            .map_err(|e| nats("open the snapshot bucket")(e.to_string()))?;
        kv.delete(snapshot_key)
            .await
            .map_err(|e| nats("update the snapshot")(e.to_string()))
    }

    /// The snapshot's entries whose key starts with `prefix`: (key, envelope), as published
    /// (the administrator reads back what administrators signed).
    ///
    /// # Errors
    /// The bucket cannot be read.
    pub async fn snapshot(&self, prefix: &str) -> Result<Vec<(String, Envelope)>, FleetError> {
        use base64::Engine as _;
        let kv = self
            .js
            .get_key_value(self.names.snapshot_bucket())
            .await
            .map_err(|e| nats("open the snapshot bucket")(e.to_string()))?;
        let mut keys = kv
            .keys()
            .await
            .map_err(|e| nats("list the snapshot")(e.to_string()))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| nats("list the snapshot")(e.to_string()))?;
            if k.starts_with(prefix) {
                names.push(k);
            }
        }
        names.sort();
        let mut out = Vec::new();
        for k in names {
            let Some(bytes) = kv
                .get(&k)
                .await
                .map_err(|e| nats("read the snapshot")(e.to_string()))?
            else {
                continue;
            };
            let envelope = serde_json::from_slice::<super::command::Signed>(&bytes)
                .ok()
                .and_then(|s| {
                    base64::engine::general_purpose::STANDARD
                        .decode(s.envelope)
                        .ok()
                })
                .and_then(|b| serde_json::from_slice::<Envelope>(&b).ok());
            if let Some(e) = envelope {
                out.push((k, e));
            }
        }
        Ok(out)
    }

    /// Every host in the view, by name.
    ///
    /// # Errors
    /// The bucket cannot be read.
    pub async fn hosts(&self) -> Result<Vec<HostView>, FleetError> {
        hosts_in(&self.js, &self.names).await
    }

    /// Every live session on every host (of `user`, email or subject, when given).
    ///
    /// # Errors
    /// The bucket cannot be read.
    pub async fn sessions(&self, user: Option<&str>) -> Result<Vec<FleetSession>, FleetError> {
        Ok(sessions_in(&self.js, &self.names)
            .await?
            .into_iter()
            .filter(|s| user.is_none_or(|u| s.user.eq_ignore_ascii_case(u)))
            .collect())
    }

    /// The host that runs session `id`, if the view has it.
    ///
    /// # Errors
    /// The bucket cannot be read.
    pub async fn owner_of(&self, id: &str) -> Result<Option<String>, FleetError> {
        Ok(self
            .sessions(None)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.host))
    }

    /// The fleet's audit events: the last `last` ones, then (with `follow`) each new one, to
    /// `each` until it answers false.
    ///
    /// A message of the events stream carries one or more events ([`super::events`]), so the
    /// last `last` messages hold at least the last `last` events: they are read, and only
    /// their last `last` events shown.
    ///
    /// # Errors
    /// The events stream cannot be read.
    pub async fn audit(
        &self,
        last: u64,
        follow: bool,
        mut each: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<(), FleetError> {
        let mut stream = self
            .js
            .get_stream(self.names.events_stream())
            .await
            .map_err(|e| nats("find the events stream")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats("read the events stream")(e.to_string()))?;
        let end = info.state.last_sequence;
        let start = end
            .saturating_sub(last)
            .max(info.state.first_sequence)
            .max(1);
        if end == 0 && !follow {
            return Ok(());
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats("read the events stream")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| nats("read the events stream")(e.to_string()))?;
        // The events up to `end`, of which the last `last` are shown.
        let keep = usize::try_from(last).unwrap_or(usize::MAX);
        let mut backlog = std::collections::VecDeque::new();
        let mut caught_up = end == 0;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| nats("read the events stream")(e.to_string()))?;
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
            for v in super::events::events_in(&m.payload) {
                if caught_up {
                    if !each(v) {
                        return Ok(());
                    }
                } else {
                    backlog.push_back(v);
                    if backlog.len() > keep {
                        backlog.pop_front();
                    }
                }
            }
            if !caught_up && seq >= end {
                caught_up = true;
                for v in backlog.drain(..) {
                    if !each(v) {
                        return Ok(());
                    }
                }
                if !follow {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Every host in the view, by name: what reading the view takes, and nothing more (the web
/// console reads it with credentials that may do only this).
///
/// # Errors
/// The bucket cannot be read.
pub async fn hosts_in(js: &jetstream::Context, names: &Names) -> Result<Vec<HostView>, FleetError> {
    bucket_values(js, names.hosts_bucket()).await
}

/// Every live session in the fleet's view, host by host: what reading it takes, and nothing
/// more (the web console reads it with credentials that may do only this).
///
/// # Errors
/// The bucket cannot be read.
pub async fn sessions_in(
    js: &jetstream::Context,
    names: &Names,
) -> Result<Vec<FleetSession>, FleetError> {
    let per_host: Vec<Vec<FleetSession>> = bucket_values(js, names.sessions_bucket()).await?;
    Ok(per_host.into_iter().flatten().collect())
}

async fn bucket_values<T: serde::de::DeserializeOwned>(
    js: &jetstream::Context,
    bucket: String,
) -> Result<Vec<T>, FleetError> {
    let kv = js
        .get_key_value(&bucket)
        .await
        .map_err(|e| nats("open a view bucket")(format!("{bucket}: {e}")))?;
    let mut keys = kv
        .keys()
        .await
        .map_err(|e| nats("list a view bucket")(e.to_string()))?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k.map_err(|e| nats("list a view bucket")(e.to_string()))?);
    }
    names.sort();
    let mut out = Vec::new();
    for k in names {
        if let Some(v) = kv
            .get(&k)
            .await
            .map_err(|e| nats("read a view bucket")(e.to_string()))?
            && let Ok(v) = serde_json::from_slice(&v)
        {
            out.push(v);
        }
    }
    Ok(out)
}

/// A host's answer to `command`, among the events of one message of the events stream.
fn outcome_of(payload: &[u8], command: &str) -> Option<HostOutcome> {
    super::events::events_in(payload).find_map(|v| outcome_in(&v, command))
}

fn outcome_in(v: &serde_json::Value, command: &str) -> Option<HostOutcome> {
    if v.get("command")?.as_str()? != command {
        return None;
    }
    let applied = v.get("kind")?.as_str()? == "fleet_command_applied";
    let outcome = if applied {
        v.get("outcome")?.as_str()?.to_owned()
    } else {
        format!("refused: {}", v.get("reason")?.as_str()?)
    };
    Some(HostOutcome {
        host: v.get("host")?.as_str()?.to_owned(),
        applied,
        outcome,
    })
}

/// Whether a host's view says it is connected now.
pub fn connected(host: &HostView) -> bool {
    now_ms().saturating_sub(host.last_seen_ms) <= CONNECTED_WITHIN_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_answer_is_found_among_the_events_of_its_message() {
        // A host that applied a burst of commands sends their answers in one message.
        let payload = concat!(
            r#"{"seq":1,"kind":"fleet_command_applied","command":"c-1","outcome":"ended 1","host":"web-1"}"#,
            "\n",
            r#"{"seq":2,"kind":"fleet_command_refused","command":"c-2","reason":"replayed","host":"web-1"}"#,
            "\n",
        );
        let applied = outcome_of(payload.as_bytes(), "c-1").expect("c-1 answered");
        assert_eq!(
            (
                applied.host.as_str(),
                applied.applied,
                applied.outcome.as_str()
            ),
            ("web-1", true, "ended 1")
        );
        let refused = outcome_of(payload.as_bytes(), "c-2").expect("c-2 answered");
        assert_eq!(
            (refused.applied, refused.outcome.as_str()),
            (false, "refused: replayed")
        );
        assert!(outcome_of(payload.as_bytes(), "c-3").is_none());
    }
}
