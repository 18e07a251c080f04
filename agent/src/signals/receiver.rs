//! The receiver: a SET from a transmitter in, validated, de-duplicated by `jti`, acted on
//! and durable before it is acknowledged. Each SET is audited with its `jti`, `iss`, event
//! type, subject and outcome; each session it touched lists it (`sessions show`).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use serde_json::{Map, Value};

use super::{
    ErrCode, SignalError, SignalsConfig, TransmitterConfig, Via,
    events::{Event, short_name},
    keys::transmitter_keys,
    set::{self, Expect, Refused, Set},
    status::Stats,
    subject::{Role, Subject},
};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    auth::{Alg, AuthConfig, ClaimMapping, IssuerKeys},
    identity::{Claims, Identity},
    locks::{LockTarget, NewLock, Sticking},
    sessions::{
        Ended, Lookup, Name, Sessions,
        model::{Session, SessionId, now_ms},
    },
    store::{AppliedSignal, DevicePosture, SeenSet, SignalWrite, Store, Write},
};

/// Seen SETs are pruned from the store at most this often.
const PRUNE_EVERY_MS: u64 = 60_000;

/// How an ending made by a SET sticks (see the table of actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sticky {
    /// The ended sessions' tokens are denied; with a user subject, a per-user cut-off too.
    DenyTokens,
    /// A per-user cut-off at the event's time.
    Cutoff,
    /// A user lock, until an administrator removes it.
    Lock,
}

/// What a SET that ends sessions and locks their user works from.
struct Ends<'a> {
    matched: &'a [Arc<Session>],
    identities: &'a BTreeSet<(String, String)>,
    user: Option<&'a Subject>,
    by: &'a str,
    reason: &'a str,
}

/// One configured transmitter, ready to receive.
pub struct Transmitter {
    pub cfg: TransmitterConfig,
    pub(crate) algs: Vec<Alg>,
    pub(crate) keys: IssuerKeys,
    /// Push: the exact `Authorization` header value the transmitter sends.
    pub(crate) push_authorization: Option<Vec<u8>>,
    pub(crate) stats: Mutex<Stats>,
}

/// What the receiver did with an accepted SET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acted on: how many sessions it touched, and what it did.
    Applied { sessions: usize, what: String },
    /// Acknowledged and nothing else (an unknown event type or subject, no session matched).
    Ignored { why: String },
    /// Its `jti` was seen before: acknowledged, not applied again.
    Duplicate,
}

impl Outcome {
    /// The outcome as audit records and status counts name it.
    pub fn label(&self) -> String {
        match self {
            Outcome::Applied { what, .. } => what.clone(),
            Outcome::Ignored { .. } => "ignored".into(),
            Outcome::Duplicate => "duplicate".into(),
        }
    }
}

/// An accepted SET: acknowledge it (202, or its `jti` in the next poll's `ack`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub jti: String,
    pub event: String,
    pub outcome: Outcome,
}

/// Why a SET was not accepted.
#[derive(Debug)]
pub enum NotAccepted {
    /// Refused: tell the transmitter (400 with `err`, or a poll `setErrs` entry).
    Refused(Refused),
    /// The agent could not act on it (store or kernel failure): not acknowledged, so the
    /// transmitter delivers it again.
    Failed(SignalError),
}

impl From<Refused> for NotAccepted {
    fn from(r: Refused) -> Self {
        NotAccepted::Refused(r)
    }
}

pub struct Receiver {
    pub(crate) sessions: Arc<Sessions>,
    store: Store,
    pub(crate) transmitters: Vec<Transmitter>,
    /// (`iss`, `jti`) → when it may be forgotten (Unix ms); `u64::MAX` while being applied.
    seen: Mutex<HashMap<(String, String), u64>>,
    /// The claim mapping of each token issuer, to re-derive a session's identity from
    /// changed claims.
    mappings: HashMap<String, ClaimMapping>,
    last_prune_ms: Mutex<u64>,
    /// With a fleet: where the SETs accepted from this agent's transmitters go, for every
    /// other agent to apply.
    fleet: Option<crate::fleet::signals::Outbox>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn read_secret(field: String, path: &std::path::Path) -> Result<Vec<u8>, SignalError> {
    let mut bytes = std::fs::read(path).map_err(|source| SignalError::Unreadable {
        field: field.clone(),
        path: path.to_owned(),
        source,
    })?;
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SignalError::Config {
            field,
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(bytes)
}

/// What the agent needs to call transmitter `index` (polling it, or managing its stream):
/// its bearer token, read now from `bearer_token_file`, and an HTTP agent that trusts the
/// transmitter's `ca_file` (or the system's roots).
///
/// # Errors
/// The token file cannot be read or is empty, or the CA file is not usable.
pub(crate) fn transmitter_client(
    index: usize,
    cfg: &super::config::TransmitterConfig,
    timeout: std::time::Duration,
) -> Result<(Option<Vec<u8>>, ureq::Agent), SignalError> {
    let at = format!("signals.transmitter[{index}]");
    let bearer = cfg
        .bearer_token_file
        .as_deref()
        .map(|p| read_secret(format!("{at}.bearer_token_file"), p))
        .transpose()?;
    let tls = crate::auth::trust::client_config(cfg.ca_file.as_deref()).map_err(|e| {
        SignalError::Config {
            field: format!("{at}.ca_file"),
            reason: e.to_string(),
        }
    })?;
    Ok((bearer, crate::auth::http_agent(timeout, tls)))
}

impl Receiver {
    /// Builds the receiver: keys of every transmitter (files read now), the SETs seen and
    /// the device postures reported before this start (from the store).
    ///
    /// # Errors
    /// An invalid `[signals]` config, an unreadable key or credential file, or the store.
    pub fn new(
        cfg: &SignalsConfig,
        auth: &AuthConfig,
        sessions: Arc<Sessions>,
        store: Store,
    ) -> Result<Self, SignalError> {
        cfg.validate()?;
        let mut transmitters = Vec::with_capacity(cfg.transmitters.len());
        for (i, t) in cfg.transmitters.iter().enumerate() {
            let at = format!("signals.transmitter[{i}]");
            let algs = t.algs(&at)?;
            let keys = transmitter_keys(&at, t, algs.clone())?;
            let push_authorization = t
                .push_authorization_file
                .as_deref()
                .map(|p| read_secret(format!("{at}.push_authorization_file"), p))
                .transpose()?;
            transmitters.push(Transmitter {
                cfg: t.clone(),
                algs,
                keys,
                push_authorization,
                stats: Mutex::new(Stats::new(t)),
            });
        }
        let now = now_ms();
        let seen = store
            .signals_seen()?
            .into_iter()
            .filter(|(_, _, s)| s.forget_after_ms >= now)
            .map(|(iss, jti, s)| ((iss, jti), s.forget_after_ms))
            .collect();
        for (device, posture) in store.signal_devices()? {
            sessions.set_device_posture(device, posture.compliant);
        }
        Ok(Self {
            sessions,
            store,
            transmitters,
            seen: Mutex::new(seen),
            mappings: auth
                .issuers
                .iter()
                .map(|i| (i.issuer.clone(), i.claims.clone()))
                .collect(),
            last_prune_ms: Mutex::new(now),
            fleet: None,
        })
    }

    /// Keeps each transmitter's keys fresh every `refresh_secs`, as the token issuers' keys
    /// are: a key the transmitter withdraws stops verifying without a restart. Ends when the
    /// receiver is dropped.
    pub fn spawn_key_refresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                if !this.transmitters.iter().any(|t| t.keys.refreshable()) {
                    return;
                }
                // A refresh fetches over HTTPS (blocking): off the runtime's threads.
                let _ = tokio::task::spawn_blocking(move || {
                    let now = std::time::Instant::now();
                    for t in &this.transmitters {
                        t.keys.refresh_if_due(now);
                    }
                })
                .await;
            }
        });
    }

    /// Hands every SET accepted from a transmitter to the fleet as well.
    #[must_use]
    pub fn with_fleet(mut self, outbox: Option<crate::fleet::signals::Outbox>) -> Self {
        self.fleet = outbox;
        self
    }

    pub fn transmitters(&self) -> &[Transmitter] {
        &self.transmitters
    }

    /// Receives one SET from transmitter `index`, acts on it, and answers once it is durable.
    ///
    /// # Errors
    /// [`NotAccepted::Refused`] with the RFC 8935 code (nothing changed), or
    /// [`NotAccepted::Failed`] (not acknowledged: the transmitter retries).
    pub async fn receive(
        self: &Arc<Self>,
        index: usize,
        token: String,
    ) -> Result<Receipt, NotAccepted> {
        self.receive_via(index, token, Via::Transmitter).await
    }

    /// Like [`Receiver::receive`], for a SET that arrived `via` the fleet too. A SET from
    /// the transmitter is also handed to the fleet (when there is one) before it is
    /// acknowledged; one from the fleet is not handed back.
    ///
    /// # Errors
    /// As [`Receiver::receive`].
    pub async fn receive_via(
        self: &Arc<Self>,
        index: usize,
        token: String,
        via: Via,
    ) -> Result<Receipt, NotAccepted> {
        let receipt = self.receive_once(index, &token, via.clone()).await?;
        if via == Via::Transmitter
            && let Some(outbox) = &self.fleet
            && !is_stream_event(&receipt.event)
        {
            // Duplicates too: a crash after the SET was applied and before it reached the
            // outbox makes the transmitter deliver it again, as a duplicate.
            let iss = &self.transmitters[index].cfg.issuer;
            if let Err(e) = outbox.put(iss, &receipt.jti, &token).await {
                tracing::error!(jti = %receipt.jti, error = %e, "cannot hand a SET to the fleet; not acknowledged");
                return Err(NotAccepted::Failed(SignalError::Store(e)));
            }
        }
        Ok(receipt)
    }

    async fn receive_once(
        self: &Arc<Self>,
        index: usize,
        token: &str,
        via: Via,
    ) -> Result<Receipt, NotAccepted> {
        let this = Arc::clone(self);
        let owned = token.to_owned();
        let validated = tokio::task::spawn_blocking(move || this.validate(index, &owned))
            .await
            .map_err(|_| NotAccepted::Failed(SignalError::Interrupted))?;
        let t = &self.transmitters[index];
        let mut set = match validated {
            Ok(set) => set,
            Err(mut refused) => {
                if via != Via::Transmitter {
                    refused.description = format!("{}: {}", via.describe(), refused.description);
                }
                self.refused(index, &refused).await;
                return Err(refused.into());
            }
        };
        set.via = via;
        let event = short_name(&set.event_type);
        let key = (set.iss.clone(), set.jti.clone());
        let replay = {
            let mut seen = lock(&self.seen);
            let prior = seen.get(&key).copied();
            if prior.is_none() {
                seen.insert(key.clone(), u64::MAX);
            }
            prior
        };
        if replay == Some(u64::MAX) {
            return Err(NotAccepted::Failed(SignalError::InFlight { jti: set.jti }));
        }
        if replay.is_some() {
            lock(&t.stats).count(&event, "duplicate", now_ms());
            let audit = self.audit_event(
                &set,
                &event,
                "duplicate",
                "a replay of a SET already applied",
            );
            tracing::debug!(jti = %set.jti, via = %set.via.describe(), "a replayed SET");
            if let Err(e) = self.store.submit(vec![Write::Audit(audit)]).await {
                tracing::warn!(error = %e, "cannot record a replayed SET");
            }
            return Ok(Receipt {
                jti: set.jti,
                event,
                outcome: Outcome::Duplicate,
            });
        }
        let acted = if set.via != Via::Transmitter && is_stream_event(&event) {
            // Verification and stream-updated events concern the stream of the agent that
            // received them, not this agent's.
            let why = "a stream event from the fleet: it concerns another agent's stream".into();
            self.ignore(index, &set, &event, why).await
        } else {
            self.act(index, &set, &event).await
        };
        match acted {
            Ok(outcome) => {
                let forget = now_ms() + t.cfg.iat_window_secs * 2000;
                lock(&self.seen).insert(key, forget);
                lock(&t.stats).count(&event, &outcome.label(), now_ms());
                self.prune_now_and_then().await;
                Ok(Receipt {
                    jti: set.jti,
                    event,
                    outcome,
                })
            }
            Err(e) => {
                lock(&self.seen).remove(&key);
                lock(&t.stats).error(&format!("acting on {}: {e}", set.jti), now_ms());
                tracing::error!(jti = %set.jti, iss = %set.iss, error = %e, "cannot act on a SET; not acknowledged");
                Err(NotAccepted::Failed(e))
            }
        }
    }

    fn validate(&self, index: usize, token: &str) -> Result<Set, Refused> {
        let t = &self.transmitters[index];
        let set = set::validate(
            token,
            &Expect {
                issuer: &t.cfg.issuer,
                audience: &t.cfg.audience,
                algs: &t.algs,
                keys: &t.keys,
                iat_window_secs: t.cfg.iat_window_secs,
            },
            now_ms() / 1000,
        )?;
        // A disabled stream refuses everything but the transmitter's own word that it is
        // enabled again (a stream-updated event, signed like any other).
        if lock(&t.stats).stream_status == "disabled"
            && !set.event_type.ends_with("/stream-updated")
        {
            return Err(Refused {
                err: ErrCode::InvalidState,
                description: "the stream is disabled".into(),
            });
        }
        Ok(set)
    }

    /// Counts and audits a refused SET (or push request). Nothing else changes.
    pub(crate) async fn refused(&self, index: usize, refused: &Refused) {
        if let Some(t) = self.transmitters.get(index) {
            lock(&t.stats).refused(refused, now_ms());
        }
        tracing::info!(err = refused.err.as_str(), description = %refused.description, "SET refused");
        let mut e = AuditEvent::new(AuditKind::SignalRefused {
            err: refused.err.as_str().to_owned(),
        });
        e.detail = refused.description.clone();
        if let Err(err) = self.store.submit(vec![Write::Audit(e)]).await {
            tracing::warn!(error = %err, "cannot record a refused SET");
        }
    }

    fn audit_event(&self, set: &Set, event: &str, outcome: &str, detail: &str) -> AuditEvent {
        let detail = match &set.via {
            Via::Transmitter => detail.to_owned(),
            via => format!("{detail} ({})", via.describe()),
        };
        let mut e = AuditEvent::new(AuditKind::SignalReceived {
            jti: set.jti.clone(),
            iss: set.iss.clone(),
            event: event.to_owned(),
            subject: set
                .subject
                .as_ref()
                .map_or_else(|| "none".into(), Subject::describe),
            outcome: outcome.to_owned(),
        });
        e.detail = detail;
        e
    }

    /// The writes every accepted SET commits: its `jti` (for de-duplication) and its audit
    /// record.
    fn set_writes(&self, index: usize, set: &Set, event: &str, outcome: &Outcome) -> Vec<Write> {
        let t = &self.transmitters[index];
        let now = now_ms();
        let detail = match outcome {
            Outcome::Applied { sessions, what } => format!("{what}: {sessions} sessions"),
            Outcome::Ignored { why } => why.clone(),
            Outcome::Duplicate => "a replay".into(),
        };
        vec![
            Write::Signal(SignalWrite::Seen {
                iss: set.iss.clone(),
                jti: set.jti.clone(),
                record: SeenSet {
                    received_at_ms: now,
                    forget_after_ms: now + t.cfg.iat_window_secs * 2000,
                    event_type: event.to_owned(),
                    outcome: outcome.label(),
                },
            }),
            Write::Audit(self.audit_event(set, event, &outcome.label(), &detail)),
        ]
    }

    fn applied(set: &Set, event: &str, session: SessionId, outcome: &str) -> Write {
        Write::Signal(SignalWrite::Applied {
            session,
            signal: AppliedSignal {
                at_ms: now_ms(),
                iss: set.iss.clone(),
                jti: set.jti.clone(),
                event: event.to_owned(),
                outcome: outcome.to_owned(),
            },
        })
    }

    /// Acts on a validated, new SET; everything it changed is durable when it returns.
    async fn act(&self, index: usize, set: &Set, event: &str) -> Result<Outcome, SignalError> {
        let t = &self.transmitters[index];
        let parsed = match Event::read(&set.event_type, &set.event) {
            Ok(e) => e,
            Err(bad) => {
                // A known event type with a payload that says nothing usable: acknowledged so
                // the transmitter stops resending it, audited so an operator sees it.
                return self
                    .ignore(index, set, event, format!("malformed event: {}", bad.0))
                    .await;
            }
        };
        let map = &t.cfg.subjects;
        let role = match parsed {
            Event::DeviceCompliance { .. } => Role::Device,
            _ => Role::User,
        };
        let subject = set.subject.as_ref();
        let needs_subject = !matches!(
            parsed,
            Event::Verification { .. } | Event::StreamUpdated { .. } | Event::Unknown
        );
        if needs_subject && !subject.is_some_and(Subject::is_supported) {
            let why = match subject {
                None => "the event names no subject".to_owned(),
                Some(s) => format!("subject format {} is not one the agent matches", s.format()),
            };
            return self.ignore(index, set, event, why).await;
        }
        let matching = |s: &Session| subject.is_some_and(|sub| sub.matches(s, role, map));
        match parsed {
            Event::Unknown => {
                self.ignore(
                    index,
                    set,
                    event,
                    "an event type the agent does not act on".into(),
                )
                .await
            }
            Event::Verification { state } => {
                let what = lock(&t.stats).verified(state.as_deref(), now_ms());
                self.commit_outcome(
                    index,
                    set,
                    event,
                    Outcome::Applied { sessions: 0, what },
                    Vec::new(),
                )
                .await
            }
            Event::StreamUpdated { status } => {
                lock(&t.stats).stream_status = status.chars().take(32).collect();
                let what = format!("stream_{}", lock(&t.stats).stream_status);
                self.commit_outcome(
                    index,
                    set,
                    event,
                    Outcome::Applied { sessions: 0, what },
                    Vec::new(),
                )
                .await
            }
            Event::SessionRevoked => {
                self.end_matching(index, set, event, &matching, Sticky::DenyTokens)
                    .await
            }
            Event::AccountDisabled | Event::AccountPurged => {
                self.end_matching(index, set, event, &matching, Sticky::Lock)
                    .await
            }
            Event::CredentialCompromise => {
                self.end_matching(index, set, event, &matching, Sticky::Cutoff)
                    .await
            }
            Event::CredentialChange { change_type } => {
                if matches!(change_type.as_str(), "revoke" | "delete" | "update") {
                    self.end_matching(index, set, event, &matching, Sticky::Cutoff)
                        .await
                } else {
                    let why = format!("credential-change {change_type:?} does not end sessions");
                    self.ignore(index, set, event, why).await
                }
            }
            Event::DeviceCompliance { compliant } => {
                let Some(device) = subject.and_then(|s| s.device_id(role)).map(str::to_owned)
                else {
                    return self
                        .ignore(index, set, event, "the subject names no device".into())
                        .await;
                };
                self.sessions.set_device_posture(device.clone(), compliant);
                let posture = Write::Signal(SignalWrite::Device {
                    id: device,
                    posture: DevicePosture {
                        compliant,
                        at_ms: now_ms(),
                        iss: set.iss.clone(),
                        jti: set.jti.clone(),
                    },
                });
                let label = if compliant {
                    "compliant"
                } else {
                    "not_compliant"
                };
                self.update_matching(
                    index,
                    set,
                    event,
                    &matching,
                    role,
                    label,
                    vec![posture],
                    move |i| {
                        i.device.compliant = Some(compliant);
                    },
                )
                .await
            }
            Event::TokenClaims { claims } => {
                let mappings = self.mappings.clone();
                self.update_matching(
                    index,
                    set,
                    event,
                    &matching,
                    role,
                    "claims_updated",
                    Vec::new(),
                    move |i| {
                        let mapping = mappings.get(&i.issuer).cloned().unwrap_or_default();
                        apply_claims(i, &claims, &mapping);
                    },
                )
                .await
            }
            Event::AssuranceLevel { current_level } => {
                let claim = map.assurance_level.claim().to_owned();
                let mappings = self.mappings.clone();
                self.update_matching(
                    index,
                    set,
                    event,
                    &matching,
                    role,
                    "assurance_updated",
                    Vec::new(),
                    move |i| {
                        let mut changed = Map::new();
                        changed.insert(claim.clone(), Value::String(current_level.clone()));
                        let mapping = mappings.get(&i.issuer).cloned().unwrap_or_default();
                        apply_claims(i, &changed, &mapping);
                    },
                )
                .await
            }
        }
    }

    async fn ignore(
        &self,
        index: usize,
        set: &Set,
        event: &str,
        why: String,
    ) -> Result<Outcome, SignalError> {
        self.commit_outcome(index, set, event, Outcome::Ignored { why }, Vec::new())
            .await
    }

    async fn commit_outcome(
        &self,
        index: usize,
        set: &Set,
        event: &str,
        outcome: Outcome,
        mut writes: Vec<Write>,
    ) -> Result<Outcome, SignalError> {
        writes.extend(self.set_writes(index, set, event, &outcome));
        match self.store.submit(writes).await {
            Ok(result) => result.map_err(SignalError::Store)?,
            Err(_) => return Err(SignalError::Store(self.store.closed())),
        };
        Ok(outcome)
    }

    /// Terminates every live session the subject names and makes the ending stick
    /// (`sticky`: their tokens denied, a per-user cut-off, or a user lock). For a denial or
    /// a cut-off, the endings, what makes them stick and the SET's record are one commit:
    /// the SET is acknowledged with all of its effect durable, or with none of it (and the
    /// transmitter delivers it again).
    async fn end_matching(
        &self,
        index: usize,
        set: &Set,
        event: &str,
        matching: &(dyn Fn(&Session) -> bool + Sync),
        sticky: Sticky,
    ) -> Result<Outcome, SignalError> {
        let lookup = set
            .subject
            .as_ref()
            .map_or(Lookup::Everywhere, |s| s.lookup(Role::User));
        let matched = self.sessions.live_where(&lookup, matching);
        let user = set.subject.as_ref().and_then(|s| s.user(Role::User));
        // The identities the subject names: those of the sessions it matched, the one an
        // iss_sub subject spells out, and, for an email with no live session, those the agent
        // has seen under that email (a cut-off still keeps their older tokens out).
        let mut identities: BTreeSet<(String, String)> = matched
            .iter()
            .map(|s| (s.identity.issuer.clone(), s.identity.subject.clone()))
            .collect();
        match user {
            Some(Subject::IssSub { iss, sub }) => {
                identities.insert((iss.clone(), sub.clone()));
            }
            Some(Subject::Email(email)) if identities.is_empty() => {
                let seen =
                    self.sessions
                        .sessions_where(&Lookup::Named(vec![Name::User(email)]), |s| {
                            s.identity
                                .email
                                .as_deref()
                                .is_some_and(|e| e.eq_ignore_ascii_case(email))
                        });
                identities.extend(
                    seen.iter()
                        .map(|s| (s.identity.issuer.clone(), s.identity.subject.clone())),
                );
            }
            _ => {}
        }
        let by = format!("signal {}", set.iss);
        let reason = format!("{event} (SET {})", set.jti);
        let sticky = match sticky {
            Sticky::Lock => {
                let ends = Ends {
                    matched: &matched,
                    identities: &identities,
                    user,
                    by: &by,
                    reason: &reason,
                };
                return self.end_and_lock(index, set, event, ends).await;
            }
            Sticky::DenyTokens => Sticking {
                deny_tokens: !matched.is_empty(),
                cutoff_at_secs: user.is_some().then_some(set.event_time),
            },
            Sticky::Cutoff => Sticking {
                deny_tokens: false,
                cutoff_at_secs: Some(set.event_time),
            },
        };
        let sticky = Sticking {
            cutoff_at_secs: sticky.cutoff_at_secs.filter(|_| !identities.is_empty()),
            ..sticky
        };
        if matched.is_empty() && sticky.cutoff_at_secs.is_none() {
            return self.no_match(index, set, event).await;
        }
        let mut what = vec!["terminated"];
        if sticky.deny_tokens {
            what.push("token denied");
        }
        if sticky.cutoff_at_secs.is_some() {
            what.push("cut-off");
        }
        let outcome = Outcome::Applied {
            sessions: matched.len(),
            what: what.join("; "),
        };
        let set_writes = self.set_writes(index, set, event, &outcome);
        let done = self
            .sessions
            .end_for_signal(&matched, &identities, sticky, &by, &reason, |ended| {
                let mut writes = Self::applied_to(set, event, ended);
                writes.extend(set_writes);
                writes
            })
            .await?;
        tracing::info!(jti = %set.jti, iss = %set.iss, event, sessions = done.ended.len(), "signal ended sessions");
        Ok(outcome)
    }

    /// Terminates the sessions the subject names as an identity event, then locks the user
    /// (`account-disabled`, `account-purged`) until an administrator removes the lock.
    async fn end_and_lock(
        &self,
        index: usize,
        set: &Set,
        event: &str,
        ends: Ends<'_>,
    ) -> Result<Outcome, SignalError> {
        self.sessions
            .end_for_signal(
                ends.matched,
                ends.identities,
                Sticking::default(),
                ends.by,
                ends.reason,
                |ended| Self::applied_to(set, event, ended),
            )
            .await?;
        let mut what = vec!["terminated".to_owned()];
        let targets: Vec<LockTarget> = match ends.user {
            Some(Subject::Email(e)) => vec![LockTarget::User(e.clone())],
            Some(Subject::Opaque(id)) => vec![LockTarget::User(id.clone())],
            _ => ends
                .identities
                .iter()
                .map(|(iss, sub)| LockTarget::Subject {
                    iss: iss.clone(),
                    sub: sub.clone(),
                })
                .collect(),
        };
        for target in targets {
            let added = self
                .sessions
                .add_lock(
                    NewLock {
                        target,
                        ttl_secs: None,
                        reason: Some(ends.reason.to_owned()),
                        show_reason: false,
                        on_behalf_of: None,
                    },
                    ends.by,
                )
                .await?;
            what.push(format!("locked {}", added.lock.id));
        }
        if ends.matched.is_empty() && what.len() == 1 {
            return self.no_match(index, set, event).await;
        }
        let outcome = Outcome::Applied {
            sessions: ends.matched.len(),
            what: what.join("; "),
        };
        tracing::info!(jti = %set.jti, iss = %set.iss, event, sessions = ends.matched.len(), "signal ended sessions and locked");
        self.commit_outcome(index, set, event, outcome, Vec::new())
            .await
    }

    /// Acknowledges a SET whose subject names no live session (nothing else to do).
    async fn no_match(&self, index: usize, set: &Set, event: &str) -> Result<Outcome, SignalError> {
        let why = "no live session matches the subject".into();
        self.ignore(index, set, event, why).await
    }

    /// The per-session records of a SET that ended these sessions.
    fn applied_to(set: &Set, event: &str, ended: &[Ended]) -> Vec<Write> {
        ended
            .iter()
            .map(|e| Self::applied(set, event, e.id, "terminated"))
            .collect()
    }

    /// Changes what the identity provider said about the sessions the subject names, then
    /// re-evaluates them against policy.
    #[allow(clippy::too_many_arguments)]
    async fn update_matching(
        &self,
        index: usize,
        set: &Set,
        event: &str,
        matching: &(dyn Fn(&Session) -> bool + Sync),
        role: Role,
        label: &str,
        extra: Vec<Write>,
        update: impl Fn(&mut Identity) + Send + 'static,
    ) -> Result<Outcome, SignalError> {
        let lookup = set
            .subject
            .as_ref()
            .map_or(Lookup::Everywhere, |s| s.lookup(role));
        let ids: Vec<SessionId> = self
            .sessions
            .live_where(&lookup, matching)
            .iter()
            .map(|s| s.id)
            .collect();
        if ids.is_empty() {
            // The posture of the device is still recorded, for its next login.
            let outcome = Outcome::Ignored {
                why: format!("{label}: no live session matches the subject"),
            };
            return self.commit_outcome(index, set, event, outcome, extra).await;
        }
        let change = self
            .sessions
            .update_identities(ids, update, Vec::new())
            .await?;
        // New groups may be locked out.
        self.sessions
            .enforce_locks(&format!("signal {}", set.iss))
            .await?;
        let lost: HashMap<SessionId, &Vec<String>> =
            change.lost.iter().map(|(id, r)| (*id, r)).collect();
        let ended: HashSet<SessionId> = change.terminated.iter().copied().collect();
        let mut writes = extra;
        for id in &change.updated {
            let what = if ended.contains(id) {
                format!("{label}; terminated: policy allows nothing")
            } else if let Some(resources) = lost.get(id) {
                format!("{label}; severed {}", resources.join(", "))
            } else {
                label.to_owned()
            };
            writes.push(Self::applied(set, event, *id, &what));
        }
        let severed = change.lost.len();
        let what = if severed > 0 {
            format!("{label}; {severed} sessions lost grants")
        } else {
            label.to_owned()
        };
        let outcome = Outcome::Applied {
            sessions: change.updated.len(),
            what,
        };
        self.commit_outcome(index, set, event, outcome, writes)
            .await
    }

    /// Forgets, in memory and on disk, SETs whose `iat` window has passed.
    async fn prune_now_and_then(&self) {
        let now = now_ms();
        {
            let mut last = lock(&self.last_prune_ms);
            if now.saturating_sub(*last) < PRUNE_EVERY_MS {
                return;
            }
            *last = now;
        }
        lock(&self.seen).retain(|_, forget| *forget >= now);
        let prune = vec![Write::Signal(SignalWrite::ForgetSeenBefore(now))];
        if let Ok(Err(e)) = self.store.submit(prune).await {
            tracing::warn!(error = %e, "cannot prune the SETs seen");
        }
    }

    /// Which push transmitter sent this `Authorization` value: compared in constant time with
    /// every push transmitter's (all of them, whatever matches first).
    pub(crate) fn push_transmitter(&self, authorization: Option<&[u8]>) -> Option<usize> {
        use subtle::ConstantTimeEq as _;
        let given = authorization?;
        let mut found = None;
        for (i, t) in self.transmitters.iter().enumerate() {
            if let Some(want) = &t.push_authorization {
                let same: bool = want.as_slice().ct_eq(given).into();
                if same && found.is_none() {
                    found = Some(i);
                }
            }
        }
        found
    }
}

/// Whether an event (by its short name) is about the stream it came on rather than a subject.
fn is_stream_event(event: &str) -> bool {
    matches!(event, "verification" | "stream-updated")
}

/// Merges changed claims into a session's identity, and re-derives the typed fields (email,
/// groups, device posture) from them by the issuer's claim mapping. The subject and issuer
/// never change: a different subject is a different identity.
pub(crate) fn apply_claims(
    identity: &mut Identity,
    changed: &Map<String, Value>,
    m: &ClaimMapping,
) {
    let mut all = identity.claims.to_map();
    for (k, v) in changed {
        all.insert(k.clone(), v.clone());
    }
    if let Some(Value::String(e)) = m.email.lookup(&all) {
        identity.email = Some(e);
    }
    match m.groups.lookup(&all) {
        Some(Value::String(g)) => identity.groups = vec![g],
        Some(Value::Array(items)) => {
            identity.groups = items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
        }
        _ => {}
    }
    if let Some(Value::String(id)) = m.device_id.lookup(&all) {
        identity.device.id = Some(id);
    }
    if let Some(Value::Bool(b)) = m.device_managed.lookup(&all) {
        identity.device.managed = Some(b);
    }
    if let Some(Value::Bool(b)) = m.device_compliant.lookup(&all) {
        identity.device.compliant = Some(b);
    }
    if let Some(Value::String(os)) = m.device_os.lookup(&all) {
        identity.device.os = Some(os);
    }
    identity.claims = Claims::from(all);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::identity::test_identity;

    #[test]
    fn changed_claims_re_derive_the_identity() {
        let mut id = test_identity("alice@corp.test", &["staff", "ops"]);
        let subject = id.subject.clone();
        let changed =
            json!({"groups": ["staff"], "acr": "phr", "device_compliant": false, "sub": "evil"});
        apply_claims(
            &mut id,
            changed.as_object().expect("object"),
            &ClaimMapping::default(),
        );
        assert_eq!(id.groups, ["staff"]);
        assert_eq!(id.device.compliant, Some(false));
        assert_eq!(id.claims.get("acr"), Some(json!("phr")));
        assert_eq!(id.subject, subject, "the subject never changes");
    }
}
