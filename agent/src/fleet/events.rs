//! The fleet's events stream: every audit event of this agent, in seq order, for a SIEM and
//! `fleet audit`. Consecutive events of one kind travel in one message, one JSON object per
//! line (NDJSON), on that kind's subject.
//!
//! One message per event cost a fleet member about 15 % of its admission rate on a 2-vCPU
//! host: every admission's event was a JetStream publish, stored and acknowledged on its own.
//! Under load the events of a batch share a message; a quiet agent still sends each event as
//! soon as it is committed, alone in its message.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use serde::Serialize;
use tokio::sync::broadcast;

use super::{FleetError, link::Names, nats, state::FleetState};
use crate::{
    audit::event::AuditEvent,
    store::{Store, StoreError, fleet as stored},
};

/// Audit events read from the store, and published, at a time.
const EVENTS_BATCH: usize = 500;
/// How long a busy publisher lets events gather before it takes the next batch. Under
/// admission load, sending each batch as soon as the last was acknowledged made batches of a
/// few events; gathering for this long makes tens of them per message, for a few
/// milliseconds' delay. A quiet agent (one event at a time) sends at once.
const LINGER: Duration = Duration::from_millis(10);
/// A message is closed once it holds this many bytes: well inside NATS's default limit of
/// 1 MiB a message, whatever an event's detail holds.
const MESSAGE_BYTES: usize = 256 * 1024;

/// Publishes every audit event, in seq order, to the events stream, resuming after the last
/// one the server acknowledged (kept in the store, written at most once a second).
pub async fn publish(js: jetstream::Context, names: Names, state: Arc<FleetState>, store: Store) {
    let position = store
        .fleet_value::<u64>(stored::EVENTS_POSITION)
        .ok()
        .flatten()
        .unwrap_or(0);
    let mut source = Source::new(store.clone(), position);
    let mut saved = Saved {
        position,
        stored: position,
        at: Instant::now(),
    };
    let mut delay = Duration::from_millis(200);
    // Messages not yet acknowledged: after a failure the very same messages go again, with
    // the same ids, so that one the server stored before the failure is stored once.
    let mut pending: Option<(Vec<Message>, u64, u64)> = None;
    loop {
        let (messages, last, count) = match pending.take() {
            Some(p) => p,
            None => {
                let events = match source.next(Duration::from_secs(1)).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "fleet: cannot read the audit log to publish it");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let Some(last) = events.last().map(|e| e.seq) else {
                    saved.maybe_save(&store).await;
                    continue;
                };
                (
                    messages(&names, &state.host, &events),
                    last,
                    events.len() as u64,
                )
            }
        };
        match send(&js, &messages).await {
            Ok(()) => {
                delay = Duration::from_millis(200);
                saved.position = last;
                state.events_published.fetch_add(count, Ordering::Relaxed);
                saved.maybe_save(&store).await;
                if count > 1 && count < EVENTS_BATCH as u64 {
                    tokio::time::sleep(LINGER).await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "fleet: cannot publish audit events; retrying");
                pending = Some((messages, last, count));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The last event the server acknowledged, and what of it the store holds: written when it
/// moved and a second has passed since the last write, so that a restart re-sends at most
/// about a second's worth, and an idle agent writes nothing.
struct Saved {
    position: u64,
    stored: u64,
    at: Instant,
}

impl Saved {
    async fn maybe_save(&mut self, store: &Store) {
        if self.position == self.stored || self.at.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.at = Instant::now();
        let position = self.position;
        // Not saved: the events after the last saved position go again after a restart.
        if store
            .submit(vec![stored::put(stored::EVENTS_POSITION, &position)])
            .await
            .is_ok_and(|r| r.is_ok())
        {
            self.stored = position;
        }
    }
}

/// Where the next events come from: the store's live feed of committed events while the
/// publisher keeps up with it, the store itself while it is behind (at start, or after the
/// feed dropped events it did not take in time). Reading the feed costs nothing more per
/// event; reading each one back from the store cost a fleet member's admission rate.
struct Source {
    store: Store,
    feed: broadcast::Receiver<AuditEvent>,
    /// Every event up to this seq has been handed out.
    taken: u64,
    behind: bool,
}

impl Source {
    /// Subscribes before anything is read, so that every event after `after` is either in the
    /// store when it is read or comes through the feed.
    fn new(store: Store, after: u64) -> Self {
        let feed = crate::audit::Audit::new(store.clone()).subscribe();
        Self {
            store,
            feed,
            taken: after,
            behind: true,
        }
    }

    /// The next events, in seq order, at most [`EVENTS_BATCH`]: none if none came within
    /// `wait`.
    async fn next(&mut self, wait: Duration) -> Result<Vec<AuditEvent>, StoreError> {
        loop {
            if self.behind {
                let events = self.store.audit_range(self.taken, EVENTS_BATCH)?;
                // Fewer than asked for: the rest is yet to be committed, and comes in the feed.
                self.behind = events.len() == EVENTS_BATCH;
                if let Some(last) = events.last() {
                    self.taken = last.seq;
                    return Ok(events);
                }
            }
            let mut batch = Vec::new();
            match tokio::time::timeout(wait, self.feed.recv()).await {
                Err(_) => return Ok(batch),
                Ok(Ok(event)) => self.take(event, &mut batch),
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => self.behind = true,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    // The store is closing: nothing more will be committed.
                    tokio::time::sleep(wait).await;
                    return Ok(batch);
                }
            }
            while batch.len() < EVENTS_BATCH && !self.behind {
                match self.feed.try_recv() {
                    Ok(event) => self.take(event, &mut batch),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => self.behind = true,
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    fn take(&mut self, event: AuditEvent, batch: &mut Vec<AuditEvent>) {
        if event.seq <= self.taken {
            // Read from the store already.
        } else if event.seq == self.taken + 1 {
            self.taken = event.seq;
            batch.push(event);
        } else {
            // A gap (the feed dropped events): the store has them.
            self.behind = true;
        }
    }
}

/// One message of the events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    subject: String,
    /// `<host>-<first seq>-<last seq>`: JetStream stores a retried message once.
    id: String,
    /// One JSON object per line, each an audit event with the host that wrote it.
    payload: Vec<u8>,
}

/// An audit event as the stream carries it: the event, and the host that wrote it.
#[derive(Serialize)]
struct Published<'a> {
    #[serde(flatten)]
    event: &'a AuditEvent,
    host: &'a str,
}

/// `events` (in seq order) as messages: each holds a run of consecutive events of one kind,
/// cut at [`MESSAGE_BYTES`], so that the stream keeps seq order and a subscriber to one kind's
/// subject gets only that kind.
fn messages(names: &Names, host: &str, events: &[AuditEvent]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut open: Option<(Message, &str, u64)> = None;
    for event in events {
        let kind = event.kind.name();
        if let Some((m, k, _)) = &open
            && (*k != kind || m.payload.len() >= MESSAGE_BYTES)
        {
            out.extend(open.take().map(close));
        }
        let (m, _, _) = open.get_or_insert_with(|| {
            (
                Message {
                    subject: names.events(host, kind),
                    id: format!("{host}-{}", event.seq),
                    payload: Vec::new(),
                },
                kind,
                event.seq,
            )
        });
        // An event always encodes: its fields are strings, numbers and addresses.
        if serde_json::to_writer(&mut m.payload, &Published { event, host }).is_ok() {
            m.payload.push(b'\n');
        }
        if let Some((_, _, last)) = &mut open {
            *last = event.seq;
        }
    }
    out.extend(open.map(close));
    out
}

fn close((mut m, _, last): (Message, &str, u64)) -> Message {
    m.id = format!("{}-{last}", m.id);
    m
}

/// Sends every message, then waits for the server to have stored them all.
async fn send(js: &jetstream::Context, messages: &[Message]) -> Result<(), FleetError> {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let publish = Publish::build()
            .payload(m.payload.clone().into())
            .message_id(m.id.clone());
        acks.push(
            js.send_publish(m.subject.clone(), publish)
                .await
                .map_err(|e| nats("publish audit events")(e.to_string()))?,
        );
    }
    for ack in acks {
        ack.await
            .map_err(|e| nats("have audit events stored")(e.to_string()))?;
    }
    Ok(())
}

/// The audit events one message of the events stream carries, in seq order. Lines that are
/// not JSON objects are skipped.
pub fn events_in(payload: &[u8]) -> impl Iterator<Item = serde_json::Value> + '_ {
    payload
        .split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter(serde_json::Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::AuditKind;

    fn event(seq: u64, kind: AuditKind, detail: &str) -> AuditEvent {
        let mut e = AuditEvent::new(kind);
        e.seq = seq;
        e.user = Some("alice@corp.example".into());
        e.detail = detail.into();
        e
    }

    fn names() -> Names {
        Names::new("flowwarden")
    }

    #[test]
    fn consecutive_events_of_one_kind_share_a_message_in_seq_order() {
        let admitted = || AuditKind::SessionAdmitted;
        let ended = || AuditKind::SessionTerminated {
            by: "uid 0".into(),
            reason: "left".into(),
        };
        let events = [
            event(7, admitted(), "granted ssh"),
            event(8, admitted(), "line\nbreak in a detail"),
            event(9, ended(), "by admin"),
            event(10, admitted(), "granted web"),
        ];
        let out = messages(&names(), "web-1", &events);
        let subjects: Vec<&str> = out.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "flowwarden.events.web-1.session_admitted",
                "flowwarden.events.web-1.session_terminated",
                "flowwarden.events.web-1.session_admitted",
            ]
        );
        let ids: Vec<&str> = out.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["web-1-7-8", "web-1-9-9", "web-1-10-10"]);
        let read: Vec<serde_json::Value> = out.iter().flat_map(|m| events_in(&m.payload)).collect();
        let seqs: Vec<u64> = read.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [7, 8, 9, 10], "every event once, in seq order");
        for (v, e) in read.iter().zip(&events) {
            assert_eq!(v["host"], "web-1");
            assert_eq!(v["kind"], e.kind.name());
            assert_eq!(
                v["detail"], e.detail,
                "a newline in a field stays in its line"
            );
            let back: AuditEvent = serde_json::from_value(v.clone()).expect("an audit event");
            assert_eq!(&back, e);
        }
    }

    #[test]
    fn a_long_run_is_cut_well_inside_the_message_limit() {
        let detail = "x".repeat(4_000);
        let events: Vec<AuditEvent> = (1..=EVENTS_BATCH as u64)
            .map(|seq| event(seq, AuditKind::SessionAdmitted, &detail))
            .collect();
        let out = messages(&names(), "web-1", &events);
        assert!(out.len() > 1, "2 MB of events are more than one message");
        for m in &out {
            assert!(
                m.payload.len() < MESSAGE_BYTES + 8 * 1024,
                "{}",
                m.payload.len()
            );
        }
        let total: usize = out.iter().map(|m| events_in(&m.payload).count()).sum();
        assert_eq!(total, EVENTS_BATCH);
    }

    /// Every committed event is handed out once, in seq order: from the store at start (the
    /// saved position is behind), from the feed while it keeps up, from the store again when
    /// the feed dropped events the publisher did not take in time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_hands_out_every_event_once_from_the_store_or_the_feed() {
        use crate::store::testing::{TempDir, event as stored_event};

        let dir = TempDir::new("events-source");
        let store = Store::open(&dir.state_file()).expect("open");
        let commit = |n: usize| {
            for _ in 0..n {
                store
                    .commit(vec![crate::store::Write::Audit(stored_event(
                        AuditKind::SessionAdmitted,
                        Some(1),
                        Some("alice@corp.example"),
                    ))])
                    .expect("commit");
            }
        };
        commit(3);
        // Resuming after seq 1, as if the server had acknowledged it before a restart.
        let mut source = Source::new(store.clone(), 1);
        let mut seen = Vec::new();
        let drain = async |source: &mut Source, seen: &mut Vec<u64>| {
            loop {
                let batch = source.next(Duration::from_millis(100)).await.expect("next");
                if batch.is_empty() {
                    return;
                }
                assert!(batch.len() <= EVENTS_BATCH);
                seen.extend(batch.iter().map(|e| e.seq));
            }
        };
        drain(&mut source, &mut seen).await;
        assert_eq!(seen, [2, 3], "from the store");
        assert!(!source.behind);
        commit(2);
        drain(&mut source, &mut seen).await;
        assert_eq!(seen, [2, 3, 4, 5], "from the feed");
        // More than the feed holds, committed before the publisher reads any of them.
        let burst = crate::store::AUDIT_FEED_CAPACITY + 10;
        commit(burst);
        drain(&mut source, &mut seen).await;
        let expected: Vec<u64> = (2..=5 + burst as u64).collect();
        assert!(
            seen == expected,
            "every event once, in order, after the feed lagged: {} handed out, the last {:?}",
            seen.len(),
            seen.last()
        );
    }

    /// An idle agent writes nothing; a moved position is written at most once a second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_position_is_written_when_it_moved_at_most_once_a_second() {
        let dir = crate::store::testing::TempDir::new("events-saved");
        let store = Store::open(&dir.state_file()).expect("open");
        let read = || {
            store
                .fleet_value::<u64>(stored::EVENTS_POSITION)
                .expect("read")
        };
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(2))
            .expect("up for 2 s");
        let mut saved = Saved {
            position: 5,
            stored: 5,
            at: long_ago,
        };
        saved.maybe_save(&store).await;
        assert_eq!(read(), None, "nothing moved, nothing written");
        saved.position = 9;
        saved.maybe_save(&store).await;
        assert_eq!((read(), saved.stored), (Some(9), 9));
        saved.position = 12;
        saved.maybe_save(&store).await;
        assert_eq!(read(), Some(9), "not again within a second");
    }

    #[test]
    fn a_message_of_one_event_reads_as_before() {
        // What agents before batching wrote: one object, no newline.
        let old = br#"{"seq":3,"at_ms":1,"kind":"session_admitted","host":"h"}"#;
        let read: Vec<_> = events_in(old).collect();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0]["seq"], 3);
        assert_eq!(events_in(b"not json\n[1]\n").count(), 0);
    }
}
