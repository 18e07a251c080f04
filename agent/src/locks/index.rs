//! The in-memory index behind every admission check: locks by what they match, denied tokens
//! by key, cut-offs by issuer and subject. A check is a handful of hash lookups whatever the
//! number of locks (one per prefix length in use for source locks).

use std::{collections::BTreeMap, net::IpAddr};

use foldhash::{HashMap, HashMapExt};
use ipnet::IpNet;

use super::model::{Cutoff, Denial, Lock, LockId, LockTarget, Refusal, parse_prefix};
use crate::{identity::Identity, sessions::model::SessionId};

/// Hash keys of the targets that are matched exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// Lowercase email or subject.
    User(String),
    Group(String),
    Device(String),
    Session(u64),
    Token(String),
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) locks: HashMap<LockId, Lock>,
    exact: HashMap<Key, Vec<LockId>>,
    /// issuer → subject → locks.
    subjects: HashMap<String, HashMap<String, Vec<LockId>>>,
    /// prefix length → network → locks, per address family.
    v4: BTreeMap<u8, HashMap<IpAddr, Vec<LockId>>>,
    v6: BTreeMap<u8, HashMap<IpAddr, Vec<LockId>>>,
    pub(super) denials: HashMap<String, Denial>,
    /// issuer → subject → cut-off.
    pub(super) cutoffs: HashMap<String, HashMap<String, Cutoff>>,
}

/// Who is being admitted (or reconnected): what a lock can match.
pub struct Subject<'a> {
    pub identity: &'a Identity,
    pub source: IpAddr,
    /// A reconnect's session.
    pub session: Option<SessionId>,
}

fn key_of(t: &LockTarget) -> Option<Key> {
    Some(match t {
        LockTarget::User(u) => Key::User(u.to_lowercase()),
        LockTarget::Group(g) => Key::Group(g.clone()),
        LockTarget::Device(d) => Key::Device(d.clone()),
        LockTarget::Session(id) => Key::Session(id.0),
        LockTarget::Token(t) => Key::Token(t.clone()),
        LockTarget::Subject { .. } | LockTarget::Source(_) => return None,
    })
}

impl Index {
    pub(super) fn insert_lock(&mut self, lock: Lock) {
        let id = lock.id;
        match &lock.target {
            LockTarget::Subject { iss, sub } => self
                .subjects
                .entry(iss.clone())
                .or_default()
                .entry(sub.clone())
                .or_default()
                .push(id),
            LockTarget::Source(p) => {
                if let Ok(net) = parse_prefix(p) {
                    let table = match net {
                        IpNet::V4(_) => &mut self.v4,
                        IpNet::V6(_) => &mut self.v6,
                    };
                    table
                        .entry(net.prefix_len())
                        .or_default()
                        .entry(net.network())
                        .or_default()
                        .push(id);
                }
            }
            t => {
                if let Some(k) = key_of(t) {
                    self.exact.entry(k).or_default().push(id);
                }
            }
        }
        self.locks.insert(id, lock);
    }

    pub(super) fn remove_lock(&mut self, id: LockId) -> Option<Lock> {
        let lock = self.locks.remove(&id)?;
        let drop_id = |v: &mut Vec<LockId>| v.retain(|x| *x != id);
        match &lock.target {
            LockTarget::Subject { iss, sub } => {
                if let Some(by_sub) = self.subjects.get_mut(iss) {
                    if let Some(v) = by_sub.get_mut(sub) {
                        drop_id(v);
                        if v.is_empty() {
                            by_sub.remove(sub);
                        }
                    }
                    if by_sub.is_empty() {
                        self.subjects.remove(iss);
                    }
                }
            }
            LockTarget::Source(p) => {
                if let Ok(net) = parse_prefix(p) {
                    let table = match net {
                        IpNet::V4(_) => &mut self.v4,
                        IpNet::V6(_) => &mut self.v6,
                    };
                    if let Some(nets) = table.get_mut(&net.prefix_len()) {
                        if let Some(v) = nets.get_mut(&net.network()) {
                            drop_id(v);
                            if v.is_empty() {
                                nets.remove(&net.network());
                            }
                        }
                        if nets.is_empty() {
                            table.remove(&net.prefix_len());
                        }
                    }
                }
            }
            t => {
                if let Some(k) = key_of(t)
                    && let Some(v) = self.exact.get_mut(&k)
                {
                    drop_id(v);
                    if v.is_empty() {
                        self.exact.remove(&k);
                    }
                }
            }
        }
        Some(lock)
    }

    pub(super) fn insert_denial(&mut self, d: Denial) {
        self.denials.insert(d.key.clone(), d);
    }

    pub(super) fn insert_cutoff(&mut self, c: Cutoff) {
        let by_sub = self.cutoffs.entry(c.iss.clone()).or_default();
        // A later cut-off replaces an earlier one; an earlier one never loosens a later one.
        if by_sub
            .get(&c.sub)
            .is_none_or(|old| old.cutoff_secs <= c.cutoff_secs)
        {
            by_sub.insert(c.sub.clone(), c);
        }
    }

    pub(super) fn cutoff(&self, iss: &str, sub: &str) -> Option<&Cutoff> {
        self.cutoffs.get(iss)?.get(sub)
    }

    pub(super) fn cutoff_count(&self) -> usize {
        self.cutoffs.values().map(|m| m.len()).sum()
    }

    /// The first lock in force at `now_ms` that matches `who`.
    pub(super) fn matching_lock(&self, who: &Subject<'_>, now_ms: u64) -> Option<&Lock> {
        let id = who.identity;
        let holding = |ids: Option<&Vec<LockId>>| -> Option<&Lock> {
            ids?.iter()
                .filter_map(|i| self.locks.get(i))
                .find(|l| l.holds(now_ms))
        };
        if !self.exact.is_empty() {
            let mut keys = Vec::with_capacity(6 + id.groups.len());
            keys.push(Key::User(id.subject.to_lowercase()));
            if let Some(e) = &id.email {
                keys.push(Key::User(e.to_lowercase()));
            }
            keys.extend(id.groups.iter().map(|g| Key::Group(g.clone())));
            if let Some(d) = &id.device.id {
                keys.push(Key::Device(d.clone()));
            }
            if let Some(s) = who.session {
                keys.push(Key::Session(s.0));
            }
            keys.push(Key::Token(id.token_sha256.clone()));
            for k in &keys {
                if let Some(l) = holding(self.exact.get(k)) {
                    return Some(l);
                }
            }
        }
        if let Some(l) = holding(
            self.subjects
                .get(&id.issuer)
                .and_then(|m| m.get(&id.subject)),
        ) {
            return Some(l);
        }
        let table = match who.source {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        };
        for (len, nets) in table {
            let Ok(net) = IpNet::new(who.source, *len) else {
                continue;
            };
            if let Some(l) = holding(nets.get(&net.trunc().network())) {
                return Some(l);
            }
        }
        None
    }

    /// Why `who` may not be admitted now, if a denial, cut-off or lock says so.
    pub(super) fn refusal(&self, who: &Subject<'_>, now_ms: u64) -> Option<Refusal> {
        let id = who.identity;
        if !self.denials.is_empty()
            && let Some(d) = self.denials.get(&id.denial_key())
            && now_ms < d.until_ms
        {
            return Some(Refusal {
                code: "token_revoked",
                lock: None,
                detail: format!(
                    "the token of {} was revoked by {} at {} ms: {}",
                    d.user, d.by, d.at_ms, d.reason
                ),
                client_message: "this token was revoked when its session was terminated: \
                                 get a new one from your identity provider"
                    .into(),
            });
        }
        if let Some(c) = self.cutoff(&id.issuer, &id.subject) {
            let refused = match id.token_issued_at {
                Some(iat) => iat <= c.cutoff_secs,
                None => true,
            };
            if refused {
                let iat = id
                    .token_issued_at
                    .map_or_else(|| "no iat".to_owned(), |iat| format!("iat {iat}"));
                return Some(Refusal {
                    code: "issued_before_cutoff",
                    lock: None,
                    detail: format!(
                        "{} has a cut-off at {} (set by {}: {}); the token has {iat}",
                        c.user, c.cutoff_secs, c.by, c.reason
                    ),
                    client_message: "this token was issued before your sessions were cut off: \
                                     log in again at your identity provider"
                        .into(),
                });
            }
        }
        let lock = self.matching_lock(who, now_ms)?;
        Some(Refusal {
            code: "locked",
            lock: Some(lock.id),
            detail: format!(
                "{} ({}){}",
                lock.id,
                lock.target,
                lock.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
            client_message: lock.client_message(),
        })
    }

    pub(super) fn with_capacity() -> Self {
        Self {
            locks: HashMap::with_capacity(64),
            denials: HashMap::with_capacity(256),
            ..Self::default()
        }
    }
}
