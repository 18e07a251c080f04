//! Sessions by the identity values that locks and signals name (user, subject, device,
//! group), so that a lock on one user or a signal about one email finds that user's sessions
//! with a few hash lookups instead of a pass over every session in the table.
//!
//! The index only narrows: each caller still checks its own exact rule on the sessions it
//! gets back, so a hash collision costs a wasted check, never a wrong match. What it must
//! never do is miss a session, which is why every change of the table or of a session's
//! identity refiles it under the table lock (see `manager.rs`).

use std::{
    hash::{BuildHasher, Hasher},
    net::IpAddr,
};

use super::model::SessionId;
use crate::identity::Identity;

/// A value that names sessions, as a lock target or a signal's subject gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    /// An email (ASCII case-insensitively) or a subject (likewise): what `--user` means.
    User(&'a str),
    /// A subject (`sub`), whichever issuer: ASCII case-insensitively, the caller checks the
    /// issuer and the exact case.
    Subject(&'a str),
    /// A device id as the posture claims give it.
    Device(&'a str),
    /// A group.
    Group(&'a str),
}

/// Where the sessions a target or a subject may match are to be looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Among the sessions filed under any of these names.
    Named(Vec<Name<'a>>),
    /// These sessions.
    Sessions(Vec<SessionId>),
    /// The sessions whose current source is this address.
    Source(IpAddr),
    /// Every session: for what the index does not cover (a source prefix, a token, a claim
    /// path of the transmitter's choosing).
    Everywhere,
}

#[derive(Clone, Copy)]
#[repr(u8)]
enum Kind {
    Email = 1,
    Subject = 2,
    Device = 3,
    Group = 4,
}

/// The index. Keys are 64-bit hashes of (kind, value) under a per-process random seed: a
/// hash, not a copy of the string, because 100,000 sessions would otherwise hold a copy of
/// every email, subject and group once more; a random seed, so that nobody can choose
/// identities that collide on purpose.
///
/// Nearly every key names one session (an email, a subject): those are a plain key → id
/// entry, 16 bytes. A key that names several (a group, a shared device) moves to `many`, in
/// a set, so that ending 100,000 sessions of one group costs 100,000 removals, not 100,000
/// list scans. A key is in one map or the other, never both.
#[derive(Debug, Default)]
pub(super) struct ByIdentity {
    seed: foldhash::quality::RandomState,
    one: foldhash::HashMap<u64, SessionId>,
    many: foldhash::HashMap<u64, foldhash::HashSet<SessionId>>,
}

impl ByIdentity {
    fn key(&self, kind: Kind, value: &str, fold_case: bool) -> u64 {
        let mut h = self.seed.build_hasher();
        h.write_u8(kind as u8);
        if fold_case {
            // ASCII only, as the matchers compare (`eq_ignore_ascii_case`).
            let mut chunk = [0u8; 64];
            for part in value.as_bytes().chunks(chunk.len()) {
                let lower = &mut chunk[..part.len()];
                lower.copy_from_slice(part);
                lower.make_ascii_lowercase();
                h.write(lower);
            }
        } else {
            h.write(value.as_bytes());
        }
        h.write_usize(value.len());
        h.finish()
    }

    /// Every key an identity is filed under.
    fn keys_of(&self, identity: &Identity) -> Vec<u64> {
        let mut keys = Vec::with_capacity(3 + identity.groups.len());
        if let Some(email) = &identity.email {
            keys.push(self.key(Kind::Email, email, true));
        }
        keys.push(self.key(Kind::Subject, &identity.subject, true));
        if let Some(device) = &identity.device.id {
            keys.push(self.key(Kind::Device, device, false));
        }
        for g in &identity.groups {
            keys.push(self.key(Kind::Group, g, false));
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The keys a name is looked for under.
    fn keys_of_name(&self, name: Name<'_>) -> Vec<u64> {
        match name {
            Name::User(u) => vec![
                self.key(Kind::Email, u, true),
                self.key(Kind::Subject, u, true),
            ],
            Name::Subject(s) => vec![self.key(Kind::Subject, s, true)],
            Name::Device(d) => vec![self.key(Kind::Device, d, false)],
            Name::Group(g) => vec![self.key(Kind::Group, g, false)],
        }
    }

    pub(super) fn file(&mut self, id: SessionId, identity: &Identity) {
        for key in self.keys_of(identity) {
            if let Some(set) = self.many.get_mut(&key) {
                set.insert(id);
                continue;
            }
            match self.one.get(&key) {
                None => {
                    self.one.insert(key, id);
                }
                Some(first) if *first == id => {}
                Some(first) => {
                    let set = [*first, id].into_iter().collect();
                    self.one.remove(&key);
                    self.many.insert(key, set);
                }
            }
        }
    }

    /// Takes `id` off the keys `identity` filed it under (the identity it was filed with).
    pub(super) fn unfile(&mut self, id: SessionId, identity: &Identity) {
        for key in self.keys_of(identity) {
            if self.one.get(&key) == Some(&id) {
                self.one.remove(&key);
                continue;
            }
            let Some(set) = self.many.get_mut(&key) else {
                continue;
            };
            set.remove(&id);
            if set.len() <= 1 {
                let last = set.iter().next().copied();
                self.many.remove(&key);
                if let Some(last) = last {
                    self.one.insert(key, last);
                }
            }
        }
    }

    /// The sessions filed under any of `names` (a superset of those the names match; each
    /// at most once).
    pub(super) fn named(&self, names: &[Name<'_>]) -> Vec<SessionId> {
        let mut out: Vec<SessionId> = Vec::new();
        let mut keys: Vec<u64> = names.iter().flat_map(|n| self.keys_of_name(*n)).collect();
        keys.sort_unstable();
        keys.dedup();
        let several = keys.len() > 1;
        for key in keys {
            if let Some(id) = self.one.get(&key) {
                out.push(*id);
            } else if let Some(set) = self.many.get(&key) {
                out.extend(set.iter().copied());
            }
        }
        if several {
            out.sort_unstable_by_key(|id| id.0);
            out.dedup();
        }
        out
    }

    #[cfg(test)]
    pub(super) fn key_count(&self) -> usize {
        self.one.len() + self.many.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_identity;

    fn alice() -> Identity {
        let mut i = test_identity("Alice@Corp.test", &["staff", "ops"]);
        i.subject = "U-1".into();
        i.device.id = Some("laptop-7".into());
        i
    }

    #[test]
    fn a_session_is_found_by_each_name_it_answers_to() {
        let mut index = ByIdentity::default();
        let a = SessionId(1);
        index.file(a, &alice());
        let bob = test_identity("bob@corp.test", &["staff"]);
        index.file(SessionId(2), &bob);
        assert_eq!(index.named(&[Name::User("alice@corp.TEST")]), vec![a]);
        assert_eq!(
            index.named(&[Name::User("u-1")]),
            vec![a],
            "a user by subject"
        );
        assert_eq!(index.named(&[Name::Subject("U-1")]), vec![a]);
        assert_eq!(index.named(&[Name::Device("laptop-7")]), vec![a]);
        assert!(
            index.named(&[Name::Device("LAPTOP-7")]).is_empty(),
            "device ids are exact"
        );
        assert_eq!(index.named(&[Name::Group("ops")]), vec![a]);
        let mut staff = index.named(&[Name::Group("staff")]);
        staff.sort_unstable_by_key(|id| id.0);
        assert_eq!(staff, vec![a, SessionId(2)]);
        assert!(index.named(&[Name::User("carol@corp.test")]).is_empty());
        assert_eq!(
            index.named(&[Name::User("alice@corp.test"), Name::Group("ops")]),
            vec![a],
            "each session once"
        );
    }

    #[test]
    fn unfiling_leaves_no_key_behind_and_keeps_the_others() {
        let mut index = ByIdentity::default();
        let staff: Vec<SessionId> = (1..=5).map(SessionId).collect();
        let ids: Vec<Identity> = (1..=5)
            .map(|n| test_identity(&format!("u{n}@corp.test"), &["staff"]))
            .collect();
        for (id, identity) in staff.iter().zip(&ids) {
            index.file(*id, identity);
        }
        for (id, identity) in staff.iter().zip(&ids).take(4) {
            index.unfile(*id, identity);
        }
        assert_eq!(index.named(&[Name::Group("staff")]), vec![SessionId(5)]);
        assert!(index.named(&[Name::User("u1@corp.test")]).is_empty());
        index.unfile(SessionId(5), &ids[4]);
        assert_eq!(index.key_count(), 0);
    }

    #[test]
    fn a_changed_identity_is_found_by_its_new_names_only() {
        let mut index = ByIdentity::default();
        let a = SessionId(1);
        let before = alice();
        index.file(a, &before);
        let mut after = before.clone();
        after.groups = vec!["contractors".into()];
        after.device.id = Some("desktop-2".into());
        index.unfile(a, &before);
        index.file(a, &after);
        assert!(index.named(&[Name::Group("staff")]).is_empty());
        assert!(index.named(&[Name::Device("laptop-7")]).is_empty());
        assert_eq!(index.named(&[Name::Group("contractors")]), vec![a]);
        assert_eq!(index.named(&[Name::Device("desktop-2")]), vec![a]);
    }
}
