//! The control stream, agent side: a durable JetStream consumer for this host that applies
//! each signed command once (by command id) through the same core the status socket calls,
//! records it and its stream position in the agent's store, and only then acks it. Catches
//! up before the first admission; resynchronises from the snapshot bucket when its position
//! was purged from the stream.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_nats::jetstream::{self, consumer::pull};
use futures_util::{FutureExt as _, StreamExt as _};
use serde_json::Value;

use super::{
    FleetError,
    command::{self, Action, Envelope, Refusal},
    config::PolicySource,
    keys::AdminPublicKey,
    link::Names,
    nats, policy,
    state::FleetState,
};
use crate::{
    api::{
        core::Core,
        jsonrpc::Call,
        peer::{Access, Peer},
        transport::{Caller, Handler as _, Reply},
    },
    audit::event::{AuditEvent, AuditKind},
    sessions::model::now_ms,
    store::{
        Store, Write,
        fleet::{self as stored, AppliedRecord, CONTROL_POSITION},
    },
};

/// Commands handled (and committed) together at most.
const BATCH: usize = 256;
/// From this many commands in a batch, signatures are checked on two threads off the runtime.
const PARALLEL_FROM: usize = 16;
/// The longest outcome kept in the store and the audit event.
const MAX_OUTCOME: usize = 400;

/// Everything the control loop works with.
pub struct Control {
    pub core: Arc<Core>,
    pub store: Store,
    pub state: Arc<FleetState>,
    pub keys: Vec<AdminPublicKey>,
    pub names: Names,
    pub policy_source: PolicySource,
    pub state_dir: std::path::PathBuf,
}

impl Control {
    /// Follows the control stream for as long as the agent runs, starting over (with
    /// backoff) whenever the link or the stream fails.
    pub async fn run(self, js: jetstream::Context) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.follow(&js).await {
                Ok(()) => delay = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: control stream interrupted; retrying");
                    self.state.set_error(Some(e.to_string()));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn position(&self) -> Result<u64, FleetError> {
        Ok(self
            .store
            .fleet_value::<u64>(CONTROL_POSITION)?
            .unwrap_or(0))
    }

    async fn follow(&self, js: &jetstream::Context) -> Result<(), FleetError> {
        let mut stream = js
            .get_stream(self.names.control_stream())
            .await
            .map_err(|e| nats("find the control stream (has `fleet init` run?)")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats("read the control stream")(e.to_string()))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut position = self.position()?;
        if position > last {
            // The stream was recreated under us: its numbers start over. Ids still guard
            // against applying anything twice.
            tracing::warn!(
                position,
                last,
                "fleet: control stream is behind our position (recreated?); starting from its beginning"
            );
            position = 0;
            self.store
                .commit(vec![stored::put(CONTROL_POSITION, &0u64)])?;
        }
        if first > position + 1 {
            // What we missed was purged: the snapshot holds what is still in force.
            let applied = self.resync(js).await?;
            position = first - 1;
            self.store
                .commit(vec![stored::put(CONTROL_POSITION, &position)])?;
            tracing::info!(
                applied,
                position,
                "fleet: position was purged; resynchronised from the snapshot"
            );
        }
        self.state
            .control_position
            .store(position, Ordering::Relaxed);

        // Our store is the record of what was handled: the consumer starts right after it,
        // whatever an earlier consumer of ours had delivered and not seen acked.
        let durable = self.names.durable(&self.state.host);
        let _ = stream.delete_consumer(&durable).await;
        let mut consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                filter_subjects: vec![
                    self.names.control_all(),
                    self.names.control_host(&self.state.host),
                ],
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: position + 1,
                },
                // One ack per batch, for its last message: everything before it in the batch
                // is handled and durable by then too.
                ack_policy: jetstream::consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("create this host's control consumer")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| nats("read the control stream")(e.to_string()))?;
        self.state.set_error(None);
        let mut seen = HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                first = messages.next() => {
                    let Some(first) = first else {
                        return Err(FleetError::Nats { what: "read the control stream", detail: "the subscription ended".into() });
                    };
                    let mut batch = vec![first.map_err(|e| nats("read the control stream")(e.to_string()))?];
                    while batch.len() < BATCH {
                        match messages.next().now_or_never() {
                            Some(Some(m)) => batch.push(m.map_err(|e| nats("read the control stream")(e.to_string()))?),
                            _ => break,
                        }
                    }
                    let pending = self.handle_batch(batch, &mut seen).await?;
                    if pending == 0 {
                        self.state.confirm_current();
                    } else {
                        self.state.lag.store(pending, Ordering::Relaxed);
                    }
                }
                _ = tick.tick() => {
                    let info = consumer
                        .info()
                        .await
                        .map_err(|e| nats("read this host's control consumer")(e.to_string()))?;
                    if info.num_pending == 0 && info.num_ack_pending == 0 {
                        self.state.confirm_current();
                    } else {
                        self.state.lag.store(info.num_pending, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Handles a batch in order, commits what it did in one transaction, then acks. Answers
    /// how many messages the server still had for us after the last one.
    async fn handle_batch(
        &self,
        batch: Vec<jetstream::Message>,
        seen: &mut HashSet<String>,
    ) -> Result<u64, FleetError> {
        let mut writes = Vec::new();
        let mut position = self.state.control_position.load(Ordering::Relaxed);
        let mut pending = 0;
        let mut applied = 0;
        let mut refused = 0;
        // Signatures first, all of the batch at once: checking them is most of a command's
        // CPU when an agent catches up on thousands, so a large batch goes off the runtime's
        // threads (and over two). A few (tens of µs each) are checked here: a hand-off to
        // another thread would cost a live command more than it saves.
        let payloads: Vec<bytes::Bytes> = batch.iter().map(|m| m.payload.clone()).collect();
        let mut verified = if payloads.len() < PARALLEL_FROM {
            verify_all(&payloads, &self.keys)
        } else {
            let keys = self.keys.clone();
            tokio::task::spawn_blocking(move || verify_all(&payloads, &keys))
                .await
                .map_err(|e| FleetError::Nats {
                    what: "check the commands' signatures",
                    detail: e.to_string(),
                })?
        }
        .into_iter();
        let live = batch.len() == 1;
        for message in &batch {
            let checked = verified.next().expect("one verdict per message");
            let info = message
                .info()
                .map_err(|e| nats("read a control message's position")(e.to_string()))?;
            pending = info.pending;
            let seq = info.stream_sequence;
            if seq <= position {
                continue;
            }
            position = seq;
            let (w, ok) = self
                .handle(&message.payload, checked, seq, seen, live)
                .await?;
            writes.extend(w);
            if ok {
                applied += 1;
            } else {
                refused += 1;
            }
        }
        writes.push(stored::put(CONTROL_POSITION, &position));
        self.store
            .submit(writes)
            .await
            .map_err(|_| FleetError::StoreGone)??;
        self.state
            .control_position
            .store(position, Ordering::Relaxed);
        self.state
            .commands_applied
            .fetch_add(applied, Ordering::Relaxed);
        self.state
            .commands_refused
            .fetch_add(refused, Ordering::Relaxed);
        if applied + refused > 0 {
            self.state.last_event_ms.store(now_ms(), Ordering::Relaxed);
        }
        if !live {
            tracing::info!(
                applied,
                refused,
                position,
                pending,
                "fleet: a batch of commands handled"
            );
        }
        // Durable first, then acked: a crash in between redelivers, and the ids (now on
        // disk) turn the redelivery into a no-op. Acking the last acks the batch.
        if let Some(last) = batch.last() {
            last.ack()
                .await
                .map_err(|e| nats("ack a control message")(e.to_string()))?;
        }
        Ok(pending)
    }

    /// Applies one command whose signature was `checked`. Answers the writes that record it
    /// (its applied id and audit event, or the refusal's audit event) and whether it was
    /// applied. `live`: a command on its own, logged as it is applied (a catch-up's batches
    /// are logged once each).
    async fn handle(
        &self,
        bytes: &[u8],
        checked: Result<Envelope, Refusal>,
        seq: u64,
        seen: &mut HashSet<String>,
        live: bool,
    ) -> Result<(Vec<Write>, bool), FleetError> {
        let envelope = match checked {
            Ok(e) => e,
            Err(refusal) => return Ok((vec![refused(&claimed_id(bytes), &refusal)], false)),
        };
        if !envelope.is_for(&self.state.host) {
            return Ok((Vec::new(), true));
        }
        if seen.contains(&envelope.id) || self.store.fleet_applied(&envelope.id)?.is_some() {
            let refusal = Refusal::Replayed(envelope.id.clone());
            return Ok((vec![refused(&envelope.id, &refusal)], false));
        }
        let (method, outcome, mut writes) = match self.apply(&envelope).await {
            Ok(done) => done,
            Err(refusal) => return Ok((vec![refused(&envelope.id, &refusal)], false)),
        };
        seen.insert(envelope.id.clone());
        let outcome: String = outcome.chars().take(MAX_OUTCOME).collect();
        if live {
            tracing::info!(command = %envelope.id, key = %envelope.key, %method, %outcome, "fleet: command applied");
        } else {
            tracing::debug!(command = %envelope.id, key = %envelope.key, %method, %outcome, "fleet: command applied");
        }
        writes.push(stored::applied(
            &envelope.id,
            &AppliedRecord {
                seq,
                at_ms: now_ms(),
                outcome: outcome.clone(),
            },
        ));
        let mut ev = AuditEvent::new(AuditKind::FleetCommandApplied {
            command: envelope.id.clone(),
            key: envelope.key.clone(),
            method,
            outcome,
        });
        ev.detail = format!("signed by admin key {}, stream seq {seq}", envelope.key);
        writes.push(Write::Audit(ev));
        Ok((writes, true))
    }

    /// Applies a verified command: (method, outcome, extra writes).
    async fn apply(&self, envelope: &Envelope) -> Result<(String, String, Vec<Write>), Refusal> {
        match &envelope.action {
            Action::Call { method, params } => {
                // A fleet lock is named by the command that added it; each host knows which
                // of its own locks that made.
                let translated;
                let envelope = if method == "lock.remove"
                    && let Some(fleet_id) = params.get("id").and_then(Value::as_str)
                    && !fleet_id.starts_with("lk-")
                {
                    let local: Option<String> = self
                        .store
                        .fleet_value(&format!("lock/{fleet_id}"))
                        .map_err(|e| Refusal::Malformed(e.to_string()))?;
                    let Some(local) = local else {
                        return Ok((
                            method.clone(),
                            format!("no lock of fleet lock {fleet_id} on this host"),
                            Vec::new(),
                        ));
                    };
                    let mut e = envelope.clone();
                    e.action = Action::Call {
                        method: method.clone(),
                        params: serde_json::json!({ "id": local }),
                    };
                    translated = e;
                    &translated
                } else {
                    envelope
                };
                let mut call = envelope.call()?.unwrap_or(Call {
                    id: Value::from(0),
                    method: method.clone(),
                    params: Value::Null,
                });
                name_the_issuer(&mut call, envelope);
                let caller = Caller {
                    peer: Peer {
                        pid: i32::try_from(std::process::id()).unwrap_or(0),
                        uid: 0,
                        gid: 0,
                        groups: Vec::new(),
                    },
                    access: Access::Admin,
                };
                let mut writes = Vec::new();
                let outcome = match self.core.handle(call, caller).await {
                    Ok(Reply::Value(v)) => {
                        if method == "lock.add"
                            && let Some(local) = v["lock"]["id"].as_str()
                        {
                            writes.push(stored::put(&format!("lock/{}", envelope.id), &local));
                        }
                        v.to_string()
                    }
                    Ok(_) => "done".to_owned(),
                    Err(e) => format!("error {}: {}", e.code, e.message),
                };
                Ok((method.clone(), outcome, writes))
            }
            Action::Policy(bundle) => {
                let (outcome, writes) = policy::apply(
                    &self.core,
                    &self.state,
                    self.policy_source,
                    &self.state_dir,
                    bundle,
                )
                .await;
                Ok(("fleet.policy".to_owned(), outcome, writes))
            }
        }
    }

    /// Applies what the snapshot bucket holds that this agent has not applied.
    async fn resync(&self, js: &jetstream::Context) -> Result<usize, FleetError> {
        let kv = js
            .get_key_value(self.names.snapshot_bucket())
            .await
            .map_err(|e| nats("open the snapshot bucket")(e.to_string()))?;
        let mut keys = kv
            .keys()
            .await
            .map_err(|e| nats("list the snapshot")(e.to_string()))?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(|e| nats("list the snapshot")(e.to_string()))?);
        }
        let mut writes = Vec::new();
        let mut seen = HashSet::new();
        let mut applied = 0;
        for key in names {
            let Some(bytes) = kv
                .get(&key)
                .await
                .map_err(|e| nats("read the snapshot")(e.to_string()))?
            else {
                continue;
            };
            // Entries this agent applied from the stream are known by id: skipped quietly.
            let checked = command::verify(&bytes, &self.keys, now_ms());
            if let Ok(env) = &checked
                && self.store.fleet_applied(&env.id)?.is_some()
            {
                continue;
            }
            let (w, ok) = self.handle(&bytes, checked, 0, &mut seen, true).await?;
            applied += usize::from(ok && !w.is_empty());
            writes.extend(w);
        }
        self.store
            .submit(writes)
            .await
            .map_err(|_| FleetError::StoreGone)??;
        Ok(applied)
    }
}

/// Each payload's signature checked, in order; a large batch on two threads.
fn verify_all(
    payloads: &[bytes::Bytes],
    keys: &[AdminPublicKey],
) -> Vec<Result<Envelope, Refusal>> {
    let now = now_ms();
    let check = |chunk: &[bytes::Bytes]| -> Vec<Result<Envelope, Refusal>> {
        chunk
            .iter()
            .map(|p| command::verify(p, keys, now))
            .collect()
    };
    if payloads.len() < PARALLEL_FROM {
        return check(payloads);
    }
    let (first, second) = payloads.split_at(payloads.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| check(second));
        let mut out = check(first);
        // A panic in the other half is a bug in the checks: surface it here.
        out.extend(
            other
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        );
        out
    })
}

/// A fleet termination names its command and key as the reason when the admin gave none.
fn name_the_issuer(call: &mut Call, envelope: &Envelope) {
    if call.method == "sessions.terminate"
        && let Value::Object(params) = &mut call.params
        && !params.contains_key("reason")
    {
        params.insert(
            "reason".into(),
            Value::from(format!(
                "fleet command {} (admin key {})",
                envelope.id, envelope.key
            )),
        );
    }
}

/// The id a refused message claims (unverified: for the audit record and the issuer's
/// wait only), or `?`.
fn claimed_id(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let outer: Value = serde_json::from_slice(bytes).unwrap_or_default();
    let inner = outer
        .get("envelope")
        .and_then(Value::as_str)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(outer);
    inner
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .unwrap_or("?")
        .to_owned()
}

fn refused(command: &str, refusal: &Refusal) -> Write {
    tracing::warn!(command, reason = refusal.code(), detail = %refusal, "fleet: command refused");
    let mut ev = AuditEvent::new(AuditKind::FleetCommandRefused {
        command: command.to_owned(),
        reason: refusal.code().to_owned(),
    });
    ev.detail = refusal.to_string();
    Write::Audit(ev)
}
