//! Evaluation: which resources an identity may reach from a source address, and the session
//! settings that go with them. Runs for every live session after each policy change, so the
//! who-part is answered from an index built at load time and nothing allocates but the result.

use std::{borrow::Cow, collections::HashMap, hash::BuildHasherDefault, net::IpAddr};

use serde::Serialize;

use super::{Fnv64, Policy, rules::Rule};
use crate::{
    identity::Identity,
    sessions::model::{SessionGrant, SessionSettings},
};

/// Session settings when no granting rule sets them.
pub const DEFAULT_SETTINGS: SessionSettings = SessionSettings {
    max_duration_secs: 8 * 3600,
    idle_timeout_secs: 15 * 60,
    dormant_timeout_secs: 3600,
    reconnect: true,
};

/// What the policy allows one identity from one source address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// One per resource, naming the first granting rule in file order.
    pub grants: Vec<SessionGrant>,
    /// The most conservative settings of all granting rules (defaults when denied).
    pub settings: SessionSettings,
    /// When nothing is granted: a short reason for the client.
    pub denied_reason: Option<String>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        !self.grants.is_empty()
    }
}

impl Policy {
    /// Default deny: the identity gets exactly the resources of the rules that match it, its
    /// claims, its device and `source`.
    pub fn evaluate(&self, identity: &Identity, source: IpAddr) -> Decision {
        let applicable = self.applicable(identity, source);
        let mut grants: Vec<SessionGrant> = Vec::new();
        let mut settings = Combined::default();
        for (i, rule) in self.rules.iter().enumerate() {
            if !applicable.rules.contains(i) {
                continue;
            }
            settings.add(rule);
            for (resource, resource_id) in rule.targets() {
                if !grants.iter().any(|g| g.resource_id == resource_id) {
                    grants.push(SessionGrant {
                        resource: resource.to_owned(),
                        resource_id,
                        rule: rule.name.clone(),
                    });
                }
            }
        }
        let denied_reason = grants
            .is_empty()
            .then(|| self.denied_reason(identity, source, &applicable.who));
        Decision {
            grants,
            settings: settings.finish(),
            denied_reason,
        }
    }

    /// The rules that grant `identity` something from `source`, without building a
    /// [`Decision`]: re-evaluation after a policy change asks only whether each grant a session
    /// holds survives, and with 100,000 sessions the decision's names were most of its cost.
    pub fn applicable(&self, identity: &Identity, source: IpAddr) -> Applicable<'_> {
        let who = self.who.matching(identity);
        let mut rules = RuleBits::new(self.who.words);
        let words = rules.words_mut();
        for (i, rule) in self.rules.iter().enumerate() {
            if who.contains(i)
                && rule.allows_source(source)
                && rule.claims_match(identity)
                && rule.device.check(&identity.device).is_ok()
            {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        Applicable {
            policy: self,
            who,
            rules,
        }
    }

    /// A device requirement is the one thing a user can act on, so it is named when it is all
    /// that stands between the user and a rule; anything else gets the general answer (the
    /// client is not told the rest of the policy).
    fn denied_reason(&self, identity: &Identity, source: IpAddr, who: &RuleBits) -> String {
        for (i, rule) in self.rules.iter().enumerate() {
            if who.contains(i)
                && rule.allows_source(source)
                && rule.claims_match(identity)
                && let Err(failure) = rule.device.check(&identity.device)
            {
                return failure.to_string();
            }
        }
        format!("no rule grants {} anything from {source}", identity.user())
    }
}

/// The rules of a policy that apply to one identity from one source address.
pub struct Applicable<'p> {
    policy: &'p Policy,
    /// Rules whose users and groups part matches (for the denial reason).
    who: RuleBits,
    /// Rules that match in full: who, source, claims and device.
    rules: RuleBits,
}

impl Applicable<'_> {
    /// Whether a matching rule grants the resource with this kernel id.
    pub fn reaches(&self, resource_id: u32) -> bool {
        self.policy
            .rules
            .iter()
            .enumerate()
            .any(|(i, rule)| self.rules.contains(i) && rule.resource_ids.contains(&resource_id))
    }
}

/// Settings of several granting rules: the shortest of each limit a rule sets, reconnect only
/// if no rule forbids it; what no rule sets comes from the defaults.
#[derive(Default)]
struct Combined {
    max_duration_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    dormant_timeout_secs: Option<u64>,
    reconnect: Option<bool>,
}

impl Combined {
    fn add(&mut self, rule: &Rule) {
        let s = &rule.session;
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max_duration_secs = min(self.max_duration_secs, s.max_duration_secs);
        self.idle_timeout_secs = min(self.idle_timeout_secs, s.idle_timeout_secs);
        self.dormant_timeout_secs = min(self.dormant_timeout_secs, s.dormant_timeout_secs);
        self.reconnect = match (self.reconnect, s.reconnect) {
            (Some(a), Some(b)) => Some(a && b),
            (a, b) => a.or(b),
        };
    }

    fn finish(self) -> SessionSettings {
        let d = DEFAULT_SETTINGS;
        SessionSettings {
            max_duration_secs: self.max_duration_secs.unwrap_or(d.max_duration_secs),
            idle_timeout_secs: self.idle_timeout_secs.unwrap_or(d.idle_timeout_secs),
            dormant_timeout_secs: self.dormant_timeout_secs.unwrap_or(d.dormant_timeout_secs),
            reconnect: self.reconnect.unwrap_or(d.reconnect),
        }
    }
}

type FastMap = HashMap<String, Box<[u64]>, BuildHasherDefault<Fnv64>>;

/// For each user and group named by a rule, the rules that name it, as bit sets over rule
/// indices: one lookup per identity attribute instead of one scan per rule.
#[derive(Debug, Clone, Default)]
pub(super) struct WhoIndex {
    words: usize,
    /// Rules that name no users or groups (everyone, or claims only).
    anyone: Box<[u64]>,
    /// Lowercased users, for emails (compared case-insensitively).
    by_email: FastMap,
    /// Users as written, for subjects (compared exactly).
    by_subject: FastMap,
    by_group: FastMap,
    /// Which (length, first byte, last byte) shapes the groups of `by_group` have: tokens
    /// carry tens of groups that no rule names, and this rules most out without hashing.
    group_shapes: [u64; 4],
}

impl WhoIndex {
    pub(super) fn build(rules: &[Rule]) -> Self {
        let words = rules.len().div_ceil(64);
        let mut index = Self {
            words,
            anyone: vec![0; words].into(),
            ..Self::default()
        };
        let set = |map: &mut FastMap, key: String, i: usize| {
            map.entry(key).or_insert_with(|| vec![0; words].into())[i / 64] |= 1 << (i % 64);
        };
        for (i, rule) in rules.iter().enumerate() {
            if !rule.names_people() {
                index.anyone[i / 64] |= 1 << (i % 64);
            }
            for user in &rule.users {
                set(&mut index.by_email, user.to_ascii_lowercase(), i);
                set(&mut index.by_subject, user.clone(), i);
            }
            for group in &rule.groups {
                set(&mut index.by_group, group.clone(), i);
                let shape = shape(group);
                index.group_shapes[shape / 64] |= 1 << (shape % 64);
            }
        }
        index
    }

    /// The rules whose users and groups part matches `identity`.
    pub(super) fn matching(&self, identity: &Identity) -> RuleBits {
        let mut bits = RuleBits::new(self.words);
        let words = bits.words_mut();
        let mut add = |set: Option<&Box<[u64]>>| {
            if let Some(set) = set {
                for (w, s) in words.iter_mut().zip(set.iter()) {
                    *w |= s;
                }
            }
        };
        add(Some(&self.anyone));
        add(self.by_subject.get(identity.subject.as_str()));
        // Only when a rule names users: the email's bytes are a cache miss per session when a
        // policy change re-evaluates 100,000 of them.
        if let Some(email) = identity.email.as_deref()
            && !self.by_email.is_empty()
        {
            let mut buf = [0u8; 128];
            add(self.by_email.get(lowercase(email, &mut buf).as_ref()));
        }
        if !self.by_group.is_empty() {
            for group in &identity.groups {
                let shape = shape(group);
                if self.group_shapes[shape / 64] & (1 << (shape % 64)) != 0 {
                    add(self.by_group.get(group.as_str()));
                }
            }
        }
        bits
    }
}

/// A cheap 8-bit digest of a name's length and ends, for `group_shapes`.
fn shape(name: &str) -> usize {
    let b = name.as_bytes();
    let (first, last) = (b.first().copied(), b.last().copied());
    let (first, last) = (
        usize::from(first.unwrap_or(0)),
        usize::from(last.unwrap_or(0)),
    );
    (b.len().wrapping_mul(61) ^ first.wrapping_mul(7) ^ last.wrapping_mul(131)) & 0xff
}

/// `text` in ASCII lowercase, in `buf` when it fits: most emails do, and need no allocation.
fn lowercase<'a>(text: &'a str, buf: &'a mut [u8; 128]) -> Cow<'a, str> {
    if !text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(text);
    }
    if let Some(dst) = buf.get_mut(..text.len()) {
        dst.copy_from_slice(text.as_bytes());
        dst.make_ascii_lowercase();
        // ASCII case changes keep UTF-8 valid, so this always succeeds.
        if let Ok(lower) = std::str::from_utf8(dst) {
            return Cow::Borrowed(lower);
        }
    }
    Cow::Owned(text.to_ascii_lowercase())
}

/// A set of rule indices; on the stack for policies of up to 256 rules.
pub(super) enum RuleBits {
    Inline([u64; 4]),
    Heap(Vec<u64>),
}

impl RuleBits {
    fn new(words: usize) -> Self {
        if words <= 4 {
            Self::Inline([0; 4])
        } else {
            Self::Heap(vec![0; words])
        }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        match self {
            Self::Inline(w) => w,
            Self::Heap(w) => w,
        }
    }

    pub(super) fn contains(&self, i: usize) -> bool {
        let words: &[u64] = match self {
            Self::Inline(w) => w,
            Self::Heap(w) => w,
        };
        words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

#[cfg(test)]
pub(crate) mod tests;
